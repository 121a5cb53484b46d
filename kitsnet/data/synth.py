"""Deterministic synthetic KiTS21-like CT cases, so the whole pipeline can run on a laptop CPU.

The real KiTS21 data (300 cases, tens of GB) cannot ship with the repository, yet
preprocessing, cascade training and evaluation should still run end to end.  Each synthetic
case is a scaled-down abdomen (about 120 mm in-plane, 80 mm along slices) written in exactly
KiTS21's layout, dtypes, axis order and affine, so every other module sees what it would see
on the real data: anisotropic spacing drawn from KiTS21's ranges, partial volume on thick
slices, noise, exophytic tumours and optional cysts.

Geometry lives in millimetres in a world frame ``(z, y, x)`` centred on the volume, where z
grows with the slice index (inferior), y with the row (posterior) and x with the column
(patient left) -- exactly what the KiTS21 affine (axis codes I, P, L) says about the array
axes, so "liver on the patient's right" means small column indices, as in the real scans.
Intensities are rendered on sub-slices and averaged (partial volume); labels are decided at
voxel centres, as annotations are.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter

from kitsnet.core.io import KitsnetError, save_volume

__all__ = ["SLICE_THICKNESSES", "generate_case", "kits_affine", "make_dataset"]

#: KiTS21-like slice thicknesses (mm); in-plane spacing is uniform in ``INPLANE_RANGE``.
SLICE_THICKNESSES = (0.5, 0.8, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 5.0)
INPLANE_RANGE = (0.44, 1.04)
FOV_MM = (80.0, 120.0, 120.0)  # slices, rows, cols; each case varies it by +-10 %
SUB_SLICE_MM = 0.75  # thick slices are averaged from sub-slices at most this far apart
HU_MIN, HU_MAX = -1024, 3071
KIDNEY, TUMOR, CYST = 1, 2, 3

Axes = tuple[np.ndarray, np.ndarray, np.ndarray]
Value = float | Callable[[list[np.ndarray]], np.ndarray]


@dataclass(frozen=True)
class _Ellipsoid:
    """An ellipsoid ``centre + rot @ u`` with ``sum((u / semi)**2) <= 1`` (mm, world frame)."""

    centre: np.ndarray
    semi: np.ndarray
    rot: np.ndarray = field(default_factory=lambda: np.eye(3))

    def shrunk(self, by: float) -> _Ellipsoid:
        return _Ellipsoid(self.centre, np.maximum(self.semi - by, 0.5), self.rot)

    def distance(self, axes: Axes, margin: float):
        """Approximate signed distance (mm) inside the bounding box grown by ``margin``.

        Only the box is evaluated, so small organs cost little on a large grid.  The distance
        is the first-order estimate ``(q - 1) / |grad q|`` with ``q`` the normalised radius:
        exact for spheres, good to a fraction of a voxel near any ellipsoid's surface, which
        is all that soft edges and centre-based labels need.
        """
        ext = np.sqrt(((self.rot * self.semi) ** 2).sum(axis=1)) + margin
        box, rel = [], []
        for i, coord in enumerate(axes):
            lo = int(np.searchsorted(coord, self.centre[i] - ext[i]))
            hi = int(np.searchsorted(coord, self.centre[i] + ext[i], side="right"))
            box.append(slice(lo, hi))
            shape = [1, 1, 1]
            shape[i] = hi - lo
            rel.append((coord[lo:hi] - self.centre[i]).astype(np.float32).reshape(shape))
        q2 = g2 = np.float32(0)
        for k in range(3):
            u = rel[0] * self.rot[0, k] + rel[1] * self.rot[1, k] + rel[2] * self.rot[2, k]
            q2 = q2 + (u / self.semi[k]) ** 2
            g2 = g2 + (u / self.semi[k] ** 2) ** 2
        q = np.sqrt(q2)  # the tiny terms keep the exact centre deep inside instead of 0/0
        d = (q - 1) * (q + 1e-6) / (np.sqrt(g2) + 1e-6 / self.semi.max())
        return tuple(box), d.astype(np.float32, copy=False), rel


def _rotation(degrees_zyx) -> np.ndarray:
    """Rotate about the z, y and x axes in turn; columns are the body axes in world frame."""
    r = np.eye(3)
    for axis, angle in enumerate(np.deg2rad(degrees_zyx)):
        i, j = (k for k in range(3) if k != axis)
        m = np.eye(3)
        m[i, i] = m[j, j] = math.cos(angle)
        m[i, j], m[j, i] = -math.sin(angle), math.sin(angle)
        r = r @ m
    return r


def _cyl(y: float, x: float, semi_y: float, semi_x: float) -> _Ellipsoid:
    """An elliptic cylinder along z: the body's 2D cross-section, rendered once."""
    return _Ellipsoid(np.array([0.0, y, x]), np.array([1e4, semi_y, semi_x]))


def _paint(img, axes, shape: _Ellipsoid, value: Value, edge: float, within=None) -> None:
    """Blend ``value`` into ``img`` with a linear edge ``edge`` mm wide (in-plane partial volume).

    ``within`` (a ``(1, rows, cols)`` weight) confines organs such as the liver and bowel to
    the abdominal cavity without modelling their real shapes.
    """
    box, d, rel = shape.distance(axes, margin=edge)
    if d.size == 0:
        return
    alpha = np.clip(0.5 - d / edge, 0.0, 1.0)
    if within is not None:
        alpha *= within[:, box[1], box[2]]
    target = value(rel) if callable(value) else np.float32(value)
    view = img[box]
    view += alpha * (target - view)


def _label(label: np.ndarray, axes: Axes, shape: _Ellipsoid, value: int) -> None:
    box, d, _ = shape.distance(axes, margin=0.0)
    label[box][d <= 0] = value


def _texture(rng: np.random.Generator, mean: float, amp: float, waves: int = 6):
    """A smooth random field (sum of plane waves, 6-14 mm wavelength) for tumour heterogeneity."""
    dirs = rng.normal(size=(waves, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    k = dirs * (2 * np.pi / rng.uniform(6.0, 14.0, size=(waves, 1)))
    phase = rng.uniform(0, 2 * np.pi, size=waves)
    scale = np.float32(amp * math.sqrt(2.0 / waves))

    def field_(rel: list[np.ndarray]) -> np.ndarray:
        out = np.float32(mean)
        for kk, ph in zip(k, phase, strict=True):
            out = out + scale * np.cos(rel[0] * kk[0] + rel[1] * kk[1] + rel[2] * kk[2] + ph)
        return out

    return field_


def _air_fluid(level: float, gas: float, fluid: float):
    """Bowel lumen: gas rises anteriorly (smaller y, patient supine) above a fluid level."""
    return lambda rel: np.where(rel[1] < level, np.float32(gas), np.float32(fluid))


def _on_surface(rng: np.random.Generator, kidney: _Ellipsoid, radius: float, depth: float):
    """Centre for a lesion on the kidney surface; ``depth`` > 0 (in radii) makes it exophytic."""
    u = rng.normal(size=3) * np.array([0.5, 1.0, 1.0])  # favour the mid-pole, stay in the FOV
    u /= np.linalg.norm(u)
    normal = u / kidney.semi
    normal /= np.linalg.norm(normal)
    return kidney.centre + kidney.rot @ (kidney.semi * u + depth * radius * normal)


@dataclass(frozen=True)
class _Grid:
    """Where a case's voxels lie (mm, world frame), shared by every rendering step."""

    spacing: tuple[float, float, float]
    shape: tuple[int, int, int]
    centres: Axes  # voxel centres: labels are decided here
    axes: Axes  # sub-slice centres along z: intensities are rendered here, then averaged
    flat: Axes  # one plane, for the cross-section that is constant along z
    sub: int  # sub-slices per slice
    edge: float  # width (mm) of the in-plane partial-volume edge


@dataclass(frozen=True)
class _Torso:
    """The body cross-section's landmarks that organs are placed against (mm)."""

    cy: float  # body centre (row, column)
    cx: float
    cav_y: float  # semi-axes of the abdominal cavity
    cav_x: float
    v_y: float  # row of the vertebral body's centre, and its radius
    r_v: float
    vertebra: _Ellipsoid
    inside: np.ndarray  # (1, rows, cols) weight: 1 inside the cavity, soft at its edge


def _grid(spacing, fov) -> _Grid:
    """The voxel and sub-slice coordinates of a ``fov`` (mm) field of view at ``spacing``."""
    shape = tuple(max(1, round(f / s)) for f, s in zip(fov, spacing, strict=True))
    z, y, x = ((np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing, strict=True))
    sub = max(1, math.ceil(spacing[0] / SUB_SLICE_MM - 1e-9))
    z_sub = (z[:, None] + ((np.arange(sub) + 0.5) / sub - 0.5) * spacing[0]).ravel()
    return _Grid(spacing, shape, (z, y, x), (z_sub, y, x), (np.zeros(1), y, x), sub, spacing[1])


def _cross_section(rng: np.random.Generator, grid: _Grid, fov) -> tuple[np.ndarray, _Torso]:
    """The 2D cross-section, constant along z: body, wall, cavity, psoas, vessels, spine."""
    flat, edge = grid.flat, grid.edge
    base = np.full((1, grid.shape[1], grid.shape[2]), -1000.0, np.float32)
    by, bx = fov[1] * rng.uniform(0.32, 0.37), fov[2] * rng.uniform(0.42, 0.47)
    cy, cx = rng.uniform(-3, 3, size=2)
    fat_t, wall_t = rng.uniform(2, 6), rng.uniform(3, 5)
    cav_y, cav_x = by - fat_t - wall_t, bx - fat_t - wall_t
    _paint(base, flat, _cyl(cy, cx, by, bx), rng.uniform(-110, -90), edge)  # subcutaneous fat
    _paint(base, flat, _cyl(cy, cx, by - fat_t, bx - fat_t), rng.uniform(40, 60), edge)
    cavity = _cyl(cy, cx, cav_y, cav_x)
    _paint(base, flat, cavity, rng.uniform(-100, -80), edge)  # visceral fat
    box, d, _ = cavity.distance(flat, edge)
    inside = np.zeros_like(base)
    inside[box] = np.clip(0.5 - d / edge, 0, 1)
    r_v = rng.uniform(8, 10)
    v_y = cy + by - fat_t - 22 - r_v / 2  # vertebral body: posterior, in the midline
    _paint(base, flat, _cyl(v_y + r_v + 7, cx, 10, 18), rng.uniform(40, 60), edge)  # paraspinal
    for side in (-1, 1):
        _paint(base, flat, _cyl(v_y - 1, cx + side * (r_v + 5), 6, 5), 50, edge)  # psoas
    _paint(base, flat, _cyl(v_y - r_v - 6, cx + 4, 5.5, 5.5), rng.uniform(180, 260), edge)  # aorta
    _paint(base, flat, _cyl(v_y - r_v - 5, cx - 9, 4.5, 6), rng.uniform(100, 160), edge)  # IVC
    vertebra = _cyl(v_y, cx, r_v, r_v * 1.1)
    _paint(base, flat, _cyl(v_y + r_v + 3, cx, 6, 6), rng.uniform(500, 700), edge)  # arch
    _paint(base, flat, _cyl(v_y + r_v + 3, cx, 3.5, 3.5), 15, edge)  # spinal canal
    _paint(base, flat, vertebra, rng.uniform(400, 700), edge)  # cortical shell
    _paint(base, flat, vertebra.shrunk(1.5), rng.uniform(180, 240), edge)  # cancellous bone
    return base, _Torso(cy, cx, cav_y, cav_x, v_y, r_v, vertebra, inside)


def _discs(rng: np.random.Generator, img: np.ndarray, grid: _Grid, torso: _Torso) -> None:
    """Intervertebral discs: the vertebra's cross-section on a few sub-slices, periodically."""
    edge, z_sub = grid.edge, grid.axes[0]
    period, disc_t = rng.uniform(24, 30), rng.uniform(3, 5)
    box, d, _ = torso.vertebra.distance(grid.flat, edge)
    alpha = np.clip(0.5 - d[0] / edge, 0, 1)
    for i in np.flatnonzero((z_sub - rng.uniform(0, period)) % period < disc_t):
        view = img[i, box[1], box[2]]
        view += alpha * (np.float32(80) - view)  # intervertebral disc


def _viscera(rng: np.random.Generator, img: np.ndarray, grid: _Grid, torso: _Torso, fov) -> None:
    """Liver, spleen and bowel loops, confined to the abdominal cavity."""
    axes, edge, inside = grid.axes, grid.edge, torso.inside
    cy, cx, cav_y, cav_x = torso.cy, torso.cx, torso.cav_y, torso.cav_x
    liver = _Ellipsoid(
        np.array([-fov[0] * 0.25 + rng.uniform(-5, 5), cy - 0.15 * cav_y, cx - 0.45 * cav_x]),
        np.array([rng.uniform(35, 45), 0.7 * cav_y, 0.5 * cav_x]),
        _rotation(rng.uniform(-10, 10, size=3)),
    )
    _paint(img, axes, liver, rng.uniform(60, 90), edge, inside)
    spleen = _Ellipsoid(
        np.array([-fov[0] * 0.3, cy + 0.2 * cav_y, cx + 0.6 * cav_x]),
        np.array([rng.uniform(15, 22), 8, 10]),
        _rotation([rng.uniform(20, 40), 0, 0]),
    )
    _paint(img, axes, spleen, rng.uniform(100, 130), edge, inside)
    for _ in range(rng.integers(4, 9)):  # bowel loops in the anterior half
        loop = _Ellipsoid(
            np.array([fov[0], cav_y, cav_x]) * rng.uniform([-0.45, -0.85, -0.7], [0.45, 0, 0.7])
            + np.array([0, cy, cx]),
            rng.uniform(5, 10, size=3),
            _rotation(rng.uniform(-90, 90, size=3)),
        )
        _paint(img, axes, loop, rng.uniform(70, 120), edge, inside)  # enhancing wall
        gas = rng.random() < 0.6
        lumen = _air_fluid(rng.uniform(-3, 3) if gas else -1e9, -800, rng.uniform(10, 40))
        _paint(img, axes, loop.shrunk(rng.uniform(1.5, 2.5)), lumen, edge, inside)


def _kidneys(rng: np.random.Generator, grid: _Grid, torso: _Torso) -> list[_Ellipsoid]:
    """Both kidneys beside the spine, whole inside the field of view and the cavity."""
    half_z = grid.shape[0] * grid.spacing[0] / 2
    kidneys = []
    for side in (-1, 1):  # -1: patient right (lower, beside the liver), +1: patient left
        semi = np.array([rng.uniform(25, 30), rng.uniform(12, 16), rng.uniform(12, 16)])
        rot = _rotation(
            [side * rng.uniform(10, 30), side * rng.uniform(5, 15), rng.uniform(-10, 10)]
        )
        ext = np.sqrt(((rot * semi) ** 2).sum(axis=1))
        kz = (4.0 if side < 0 else -2.0) + rng.uniform(-3, 3)
        kz = float(np.clip(kz, ext[0] + 1 - half_z, half_z - ext[0] - 1))  # keep it whole
        ky = min(torso.v_y + rng.uniform(-2, 3), torso.cy + torso.cav_y - ext[1] - 1)
        kx = side * min(torso.r_v + 9 + 0.8 * ext[2] + rng.uniform(0, 3), torso.cav_x - ext[2] - 1)
        kidneys.append(_Ellipsoid(np.array([kz, ky, torso.cx + kx]), semi, rot))
    return kidneys


def _lesion(
    rng: np.random.Generator, kidneys: list[_Ellipsoid], radius: float, depth: float
) -> _Ellipsoid:
    """A roughly spherical lesion of ``radius`` mm on a random kidney's surface."""
    kidney = kidneys[rng.integers(2)]
    centre = _on_surface(rng, kidney, radius, depth)
    semi = radius * rng.uniform(0.85, 1.15, size=3)
    return _Ellipsoid(centre, semi, _rotation(rng.uniform(-45, 45, size=3)))


def _lesions(
    rng: np.random.Generator, kidneys: list[_Ellipsoid], spacing
) -> tuple[list[_Ellipsoid], list[_Ellipsoid]]:
    """One or two tumours, and in half the cases one or two cysts clear of the tumours."""
    tumours = [
        _lesion(rng, kidneys, rng.uniform(8, 18), rng.uniform(-0.7, 0.5))
        for _ in range(rng.integers(1, 3))
    ]
    cysts = []
    for _ in range(rng.integers(1, 3) if rng.random() < 0.5 else 0):
        for _try in range(20):  # keep cysts visible: the tumour label would override them
            # a cyst much thinner than a slice is averaged away yet still labelled
            radius = max(rng.uniform(3, 10), 0.8 * spacing[0])
            cyst = _lesion(rng, kidneys, radius, rng.uniform(-0.8, 0.3))
            gap = [np.linalg.norm(cyst.centre - t.centre) - t.semi.max() for t in tumours]
            if min(gap) > cyst.semi.max() + 1:
                cysts.append(cyst)
                break
    return tumours, cysts


def _acquire(rng: np.random.Generator, img: np.ndarray, grid: _Grid) -> np.ndarray:
    """What the scanner adds: partial volume across the slice thickness, noise, int16 HU."""
    shape = grid.shape
    if grid.sub > 1:  # partial volume across the slice thickness
        img = img.reshape(shape[0], grid.sub, shape[1], shape[2]).mean(axis=1, dtype=np.float32)
    # White noise (8-20 HU) plus a faint in-plane correlated part (3-6 HU), like CT texture;
    # one reused buffer, filtered a slice at a time, keeps the largest case near 2 volumes.
    noise = rng.standard_normal(shape, dtype=np.float32)
    noise *= np.float32(rng.uniform(8, 20))
    img += noise
    for plane in noise:
        plane[...] = gaussian_filter(rng.standard_normal(plane.shape, dtype=np.float32), 1.5)
    noise *= np.float32(rng.uniform(3, 6) / max(float(noise.std()), 1e-6))
    img += noise
    np.clip(img, HU_MIN, HU_MAX, out=img)
    return np.rint(img, out=img).astype(np.int16)


def _render(rng: np.random.Generator, spacing, fov) -> tuple[np.ndarray, np.ndarray]:
    """Draw one abdomen and render it onto the grid; all sizes are physical mm.

    The steps share ``rng``: their order, and the draws' order in each, is what a seed fixes.
    """
    grid = _grid(spacing, fov)
    base, torso = _cross_section(rng, grid, fov)
    img = np.repeat(base, len(grid.axes[0]), axis=0)
    _discs(rng, img, grid, torso)
    _viscera(rng, img, grid, torso, fov)
    kidneys = _kidneys(rng, grid, torso)
    tumours, cysts = _lesions(rng, kidneys, spacing)
    axes, edge = grid.axes, grid.edge  # lesions are painted over the kidney, in this order
    for kidney in kidneys:
        _paint(img, axes, kidney, rng.uniform(150, 200), edge)  # enhancing cortex
        _paint(img, axes, kidney.shrunk(rng.uniform(3, 5)), rng.uniform(80, 120), edge)  # medulla
    for cyst in cysts:
        _paint(img, axes, cyst, rng.uniform(0, 20), edge)
    for t in tumours:
        _paint(img, axes, t, _texture(rng, rng.uniform(210, 270), rng.uniform(20, 35)), edge)
        if t.semi.min() > 7 and rng.random() < 0.4:  # necrotic core, blended over ~r/3
            _paint(img, axes, t.shrunk(0.55 * t.semi.min()), rng.uniform(20, 45), t.semi.min() / 3)
    label = np.zeros(grid.shape, np.uint8)
    for shapes, value in ((kidneys, KIDNEY), (cysts, CYST), (tumours, TUMOR)):  # KiTS21 order
        for s in shapes:
            _label(label, grid.centres, s, value)
    return _acquire(rng, img, grid), label


def generate_case(
    index: int, seed: int
) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """Return (image_int16, label_uint8, spacing) in nibabel axis order (slices, rows, cols).

    The generator is seeded with ``[seed, index]`` so case ``i`` is the same whatever the
    number of cases.  Spacing values are float32-exact so they survive a NIfTI round trip.
    """
    if index < 0 or seed < 0:
        raise KitsnetError(f"synth: index and seed must be >= 0, got index={index} seed={seed}")
    rng = np.random.default_rng([seed, index])
    inplane = float(np.float32(rng.uniform(*INPLANE_RANGE)))
    spacing = (float(rng.choice(SLICE_THICKNESSES)), inplane, inplane)
    fov_z, fov_xy = FOV_MM[0] * rng.uniform(0.9, 1.1), FOV_MM[1] * rng.uniform(0.9, 1.1)
    image, label = _render(rng, spacing, (fov_z, fov_xy, fov_xy))
    return image, label, spacing


def kits_affine(spacing: tuple[float, float, float]) -> np.ndarray:
    """The KiTS21 affine: axis codes (I, P, L), origin 0, zooms equal to ``spacing``."""
    s0, s1, s2 = (float(s) for s in spacing)
    return np.array([[0, 0, -s2, 0], [0, -s1, 0, 0], [-s0, 0, 0, 0], [0, 0, 0, 1]], dtype=float)


def make_dataset(out: str | Path, cases: int, seed: int) -> list[str]:
    """Write ``cases`` cases in KiTS21 layout under ``out`` and return their sorted ids.

    Only ``case_XXXXX/imaging.nii.gz`` and ``aggregated_MAJ_seg.nii.gz`` are (re)written,
    atomically; nothing else in ``out`` is touched, so rerunning is safe and deterministic.
    """
    out = Path(out)
    if cases < 1:
        raise KitsnetError(f"synth: need at least one case, got cases={cases}")
    if out.exists() and not out.is_dir():
        raise KitsnetError(f"synth: {out} exists and is not a folder")
    ids = []
    for index in range(cases):
        case_id = f"case_{index:05d}"
        image, label, spacing = generate_case(index, seed)
        affine = kits_affine(spacing)
        save_volume(image, out / case_id / "imaging.nii.gz", affine, spacing=spacing)
        save_volume(label, out / case_id / "aggregated_MAJ_seg.nii.gz", affine, spacing=spacing)
        ids.append(case_id)
    return ids
