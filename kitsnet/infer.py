"""Sliding-window inference, export back to the original grid, and the cascade's next stage.

Sliding window as nnU-Net: tiles at a step of ``step`` x patch, a Gaussian importance map
(sigma = ``sigma_scale`` x patch) so tile borders weigh little, optional mirroring test-time
augmentation over all spatial axes.  Logits stay float32 (never float64) and are resampled to
the original grid one channel at a time so a 1059 x 512 x 796 case stays within host memory.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import torch
from scipy.ndimage import gaussian_filter

from .checkpoint import load_checkpoint
from .io import load_json, save_volume
from .loader import find_previous_stage
from .network import build_network
from .preprocess import grid_spacing
from .resample import resample_argmax


def compute_steps(image_size: list[int], patch: list[int], step: float) -> list[list[int]]:
    """Tile starts per axis: as few tiles as needed for a step of at most ``step`` x patch,
    spread evenly so the first tile starts at 0 and the last ends at the border."""
    steps = []
    for im, pa in zip(image_size, patch, strict=True):
        target = pa * step
        n = int(np.ceil((im - pa) / target)) + 1 if im > pa else 1
        actual = (im - pa) / (n - 1) if n > 1 else 0
        steps.append([int(np.round(actual * i)) for i in range(n)])
    return steps


def gaussian_importance(patch: list[int], sigma_scale: float = 0.125) -> np.ndarray:
    """Gaussian weights centred on the patch, max 1, with no zeros (so every voxel counts)."""
    tmp = np.zeros(patch, dtype=np.float32)
    tmp[tuple(p // 2 for p in patch)] = 1
    g = gaussian_filter(tmp, [p * sigma_scale for p in patch], mode="constant", cval=0)
    g = (g / g.max()).astype(np.float32)
    g[g == 0] = g[g > 0].min()
    return g


def _mirror_sets(dim: int, axes: list[int] | None) -> list[tuple[int, ...]]:
    """Every subset of the mirror axes (the empty one, i.e. no flip, first), as nnU-Net."""
    axes = list(range(dim)) if axes is None else axes
    return [c for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)]


def _mirrored_batch(x: torch.Tensor, flips: list[tuple[int, ...]]) -> torch.Tensor:
    """(B, C, *P) tiles -> (len(flips) * B, C, *P): every tile under every flip, flip-major.

    One forward pass over the whole stack instead of one per flip: on the CPU a batch of 8+
    samples keeps every convolution on oneDNN (PyTorch falls back to its much slower im2col
    ``slow_conv3d`` for batch-1 inputs with few channels, i.e. most layers below the first),
    and per-layer overheads are paid once per stack instead of once per flip.
    """
    if len(flips) == 1 and not flips[0]:
        return x
    return torch.cat([torch.flip(x, [a + 2 for a in f]) if f else x for f in flips])


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    """(N, C, D, H, W) -> the same values with channels-last strides, whatever C is.

    ``x.contiguous(memory_format=torch.channels_last_3d)`` is a no-op for a one-channel input
    (its default strides already count as channels-last) and the convolution would then keep the
    default layout; a copy into an explicitly channels-last buffer always gives channels-last
    strides, so the first convolution, and every layer after it, runs channels-last.
    """
    n, c, *spatial = x.shape
    out = torch.empty((n, *spatial, c), dtype=x.dtype, device=x.device)
    return out.permute(0, 4, 1, 2, 3).copy_(x)


def _unmirror_sum(out: torch.Tensor, flips: list[tuple[int, ...]], acc: torch.Tensor) -> None:
    """Add the (len(flips) * B, K, *P) outputs, each flipped back, into ``acc`` (B, K, *P)."""
    for f, o in zip(flips, out.unflatten(0, (len(flips), -1)), strict=True):
        acc.add_(torch.flip(o, [a + 2 for a in f]) if f else o)


def _normalisation(
    starts: list[tuple[int, ...]], patch: list[int], weight: torch.Tensor, size: tuple[int, ...]
) -> torch.Tensor:
    """Sum of the tiles' Gaussian weights at every voxel (the denominator), computed once."""
    norm = torch.zeros(size, dtype=torch.float32, device=weight.device)
    for st in starts:
        norm[tuple(slice(s, s + p) for s, p in zip(st, patch, strict=True))] += weight
    return norm


@torch.inference_mode()
def sliding_window(
    networks: list[torch.nn.Module],
    image: np.ndarray,
    patch: list[int],
    num_classes: int,
    step: float = 0.5,
    sigma_scale: float = 0.125,
    mirror: bool = True,
    mirror_axes: list[int] | None = None,
    device: torch.device | str = "cpu",
    tile_batch: int = 1,
) -> np.ndarray:
    """Average logits of ``networks`` over tiles (and mirrors) -> (num_classes, *S) float32.

    ``image`` is (C, *S) with len(patch) spatial dims.  The volume is padded to at least the
    patch size and the padding removed again.  Each forward pass gets ``tile_batch`` tiles
    under every mirroring at once (``tile_batch`` x 8 samples for 3D with mirroring), which is
    what makes it fast on the CPU (see :func:`_mirrored_batch`) and peak activation memory
    grows with it.  Float32 throughout: the Gaussian-weighted sum of the tiles and the sum of
    the weights (computed once, not per tile), divided at the end.  3D on the CPU runs the
    networks on channels-last activations (faster convolutions; same logits to float32
    rounding), the networks themselves untouched.
    """
    dev = torch.device(device)
    dim = len(patch)
    spatial = image.shape[1:]
    pad = [max(p - s, 0) for p, s in zip(patch, spatial, strict=True)]
    pads = [(p // 2, p - p // 2) for p in pad]
    data = np.pad(image, [(0, 0), *pads], mode="constant") if any(pad) else image
    size = tuple(data.shape[1:])
    x_all = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32)).to(dev)
    flips = _mirror_sets(dim, mirror_axes) if mirror else [()]
    starts = list(itertools.product(*compute_steps(list(size), patch, step)))
    weight = torch.from_numpy(gaussian_importance(patch, sigma_scale)).to(dev)
    norm = _normalisation(starts, patch, weight, size)
    # the average over networks and flips folded into the tile weight: one multiply per tile
    tile_weight = weight / (len(networks) * len(flips))
    # 3D on the CPU: channels-last activations (only the input is converted; the weights keep
    # their layout and the networks are not modified).  oneDNN's channels-last 3D convolutions
    # are ~1.8x faster there, and kitsnet's InstanceNorm3d keeps channels-last inputs in their
    # layout (see kitsnet.network.InstanceNorm3d).  GPUs and 2D: unchanged.
    channels_last = dev.type == "cpu" and dim == 3
    logits = torch.zeros((num_classes, *size), dtype=torch.float32, device=dev)
    for b in range(0, len(starts), tile_batch):
        chunk = starts[b : b + tile_batch]
        sl = [tuple(slice(s, s + p) for s, p in zip(st, patch, strict=True)) for st in chunk]
        x = _mirrored_batch(torch.stack([x_all[(slice(None), *s)] for s in sl]), flips)
        if channels_last:
            x = _channels_last(x)
        pred = torch.zeros((len(chunk), num_classes, *patch), dtype=torch.float32, device=dev)
        for net in networks:
            # bf16 autocast on a GPU (as training); the sums stay float32.  CPU: float32.
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                out = net(x)
            _unmirror_sum(out.float().contiguous(), flips, pred)
        pred.mul_(tile_weight)
        for s, p in zip(sl, pred, strict=True):
            logits[(slice(None), *s)] += p
    logits /= norm
    crop = tuple(slice(lo, lo + s) for (lo, _), s in zip(pads, spatial, strict=True))
    return logits[(slice(None), *crop)].cpu().numpy()


def predict_volume(
    networks: list[torch.nn.Module],
    image: np.ndarray,
    plan: dict,
    inference: dict,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """Logits of a preprocessed (C, Z, Y, X) volume on its own grid; 2D plans go slice by slice."""
    kw = dict(
        num_classes=plan["num_classes"],
        step=inference["step_size"],
        sigma_scale=inference["gaussian_sigma_scale"],
        mirror=inference["mirror"],
        device=device,
        tile_batch=int(inference.get("tile_batch", 1)),
    )
    patch = list(plan["patch_size"])
    if plan["arch"]["dim"] == 3:
        return sliding_window(networks, image, patch, **kw)
    out = np.empty((plan["num_classes"], *image.shape[1:]), dtype=np.float32)
    for z in range(image.shape[1]):
        out[:, z] = sliding_window(networks, image[:, z], patch, **kw)
    return out


def load_models(
    paths: list[str | Path], device: torch.device | str = "cpu"
) -> tuple[list[torch.nn.Module], dict]:
    """Load one or more fold models (same plan) for inference, deep supervision off."""
    nets, plan = [], None
    for p in paths:
        ck = load_checkpoint(Path(p))
        plan = json.loads(ck["plan"])
        net = build_network(plan["arch"], plan["in_channels"], plan["num_classes"])
        net.load_state_dict(ck["state_dict"])
        net.deep_supervision = False
        nets.append(net.to(device).eval())
    assert plan is not None, "no model paths given"
    return nets, plan


def logits_to_original(logits: np.ndarray, geometry: dict, plan: dict) -> np.ndarray:
    """Labels on the original grid: logits resampled linearly and arg-maxed, slab by slab.

    The logits are on the case's grid for ``plan`` (a 2D plan's grid keeps the case's own
    slice spacing, :func:`kitsnet.preprocess.grid_spacing`)."""
    original = geometry["original_spacing"]
    return resample_argmax(
        logits,
        geometry["original_shape"],
        grid_spacing(plan, original),
        plan["anisotropy_threshold"],
        new_spacing=original,
    )


def logits_to_next_stage(
    logits: np.ndarray, shape: list[int], plan: dict, spacing: list[float]
) -> np.ndarray:
    """Lowres logits resampled (linear) to the fullres grid and arg-maxed -> uint8 labels."""
    return resample_argmax(logits, shape, spacing, plan["anisotropy_threshold"])


def write_prediction(seg: np.ndarray, geometry: dict, out_path: str | Path) -> None:
    """Write a label map with exactly the input image's affine, zooms and sform/qform codes."""
    import nibabel as nib

    hdr = nib.Nifti1Header()
    hdr["sform_code"], hdr["qform_code"] = geometry["sform_code"], geometry["qform_code"]
    save_volume(
        seg.astype(np.uint8),
        out_path,
        np.array(geometry["affine"]),
        header=hdr,
        spacing=tuple(geometry["original_spacing"]),
    )


def predict_fold(
    model_path: str | Path,
    cases: list[str],
    data_dir: str | Path,
    out_dir: str | Path,
    inference: dict,
    prev_dirs: list[str | Path] | None = None,
    next_stage: tuple[str | Path, str | Path] | None = None,
    device: str = "auto",
    log=print,
) -> None:
    """Predict a fold's validation cases from their preprocessed arrays.

    Writes ``out_dir/<case>.nii.gz`` on the original grid; with ``next_stage=(fullres_dir,
    out)`` also writes the segmentation resampled to the fullres grid as ``out/<case>.npy``.
    """
    from .device import pick_device

    dev = pick_device(device)
    nets, plan = load_models([model_path], dev)
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for case in cases:
        image = np.load(data_dir / f"{case}_image.npy")
        geometry = load_json(data_dir / f"{case}.json")
        if prev_dirs:
            prev = np.load(find_previous_stage(case, prev_dirs))
            onehot = np.stack([prev == k for k in range(1, plan["num_classes"])])
            image = np.concatenate([image, onehot.astype(np.float32)])
        logits = predict_volume(nets, image, plan, inference, dev)
        write_prediction(
            logits_to_original(logits, geometry, plan), geometry, out_dir / f"{case}.nii.gz"
        )
        if next_stage is not None:
            full_dir, ns_dir = Path(next_stage[0]), Path(next_stage[1])
            full_shape = load_json(full_dir / f"{case}.json")["shape"]
            seg = logits_to_next_stage(logits, full_shape, plan, plan["spacing"])
            from .io import atomic_path

            ns_dir.mkdir(parents=True, exist_ok=True)
            with atomic_path(ns_dir / f"{case}.npy") as tmp, open(tmp, "wb") as fh:
                np.save(fh, seg)
        log(f"predicted {case}")


def _inputs(path: Path) -> list[tuple[str, Path]]:
    """(name, file) pairs: a single .nii.gz, a folder of them, or a KiTS21-layout folder."""
    if path.is_file():
        name = path.name.removesuffix(".nii.gz")
        return [(path.parent.name if name == "imaging" else name, path)]
    kits = sorted(path.glob("case_*/imaging.nii.gz"))
    if kits:
        return [(p.parent.name, p) for p in kits]
    return [(p.name.removesuffix(".nii.gz"), p) for p in sorted(path.glob("*.nii.gz"))]


def predict_images(
    models_dir: Path,
    input_path: Path,
    out_dir: Path,
    configuration: str,
    checkpoint: str = "model_final.pt",
    mirror: bool = True,
    device: str = "auto",
    inference: dict | None = None,
) -> list[Path]:
    """Segment new CT scans with the 5-fold ensemble of a configuration (cascade included:
    the lowres ensemble runs first and its segmentation becomes the extra input channels)."""
    from .device import pick_device
    from .io import KitsnetError, load_volume
    from .preprocess import geometry_of, preprocess_image

    dev = pick_device(device)
    inf = {
        "step_size": 0.5,
        "gaussian_sigma_scale": 0.125,
        "tile_batch": 1,
        **(inference or {}),
        "mirror": mirror,
    }

    def ensemble(cfg: str) -> tuple[list[torch.nn.Module], dict]:
        paths = sorted((models_dir / cfg).glob(f"fold_*/{checkpoint}"))
        if not paths:
            raise KitsnetError(f"{models_dir / cfg}: no fold_*/{checkpoint} found")
        return load_models(paths, dev)

    nets, plan = ensemble(configuration)
    prev = ensemble(plan["previous_stage"]) if plan.get("previous_stage") else None
    files = _inputs(input_path)
    if not files:
        raise KitsnetError(f"{input_path}: no .nii.gz images found")
    written = []
    for name, path in files:
        vol = load_volume(path, name)
        image = preprocess_image(np.asarray(vol.array), vol.spacing, plan)
        if prev is not None:
            prev_nets, prev_plan = prev
            low = preprocess_image(np.asarray(vol.array), vol.spacing, prev_plan)
            seg = logits_to_next_stage(
                predict_volume(prev_nets, low, prev_plan, inf, dev),
                list(image.shape[1:]),
                prev_plan,
                prev_plan["spacing"],
            )
            onehot = np.stack([seg == k for k in range(1, plan["num_classes"])])
            image = np.concatenate([image, onehot.astype(np.float32)])
        logits = predict_volume(nets, image, plan, inf, dev)
        geometry = geometry_of(vol, name)
        out = Path(out_dir) / f"{name}.nii.gz"
        write_prediction(logits_to_original(logits, geometry, plan), geometry, out)
        written.append(out)
    return written
