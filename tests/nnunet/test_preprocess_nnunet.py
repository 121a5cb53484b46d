"""CT normalisation and resampling against nnU-Net v2's preprocessing of the same case.

Needs the optional ``peer`` extra; skipped without it.  Synthetic KiTS-like cases (one with
anisotropic 2.5 x 0.82 x 0.82 mm voxels, one near-isotropic 1.5 x 1.03 x 1.03 mm) go through
``kitsnet.preprocess.case`` with plans made by ``kitsnet.plan.planner.make_plan`` from
config/kits21.yaml, and through nnU-Net's ``DefaultPreprocessor.run_case_npy`` with the same plan
written as an nnU-Net plans dict by ``tests.reference.nnunet_plans`` (CTNormalization,
``resample_data_or_seg_to_shape`` with nnU-Net's default kwargs: image order 3, segmentation
order 1, order_z 0, separate-z decided automatically with threshold 3).

Tolerances: label maps exactly equal; kitsnet's exact (``ndimage.zoom``) resampling path
bit-identical; its default separable float32 path (images, logits) to 1e-5 (measured: ~1e-6),
and the exported labels equal except where nnU-Net's top two logits are within 1e-5.
"""

from __future__ import annotations

import copy
import itertools
from pathlib import Path

import numpy as np
import pytest
import yaml

pytest.importorskip("nnunetv2", reason="nnU-Net v2 is only installed with the 'peer' extra")
from nnunetv2.preprocessing.normalization.default_normalization_schemes import (  # noqa: E402
    CTNormalization,
)
from nnunetv2.preprocessing.preprocessors.default_preprocessor import (  # noqa: E402
    DefaultPreprocessor,
)
from nnunetv2.preprocessing.resampling.default_resampling import (  # noqa: E402
    compute_new_shape,
    determine_do_sep_z_and_axis,
    resample_data_or_seg_to_shape,
)

from kitsnet.core.resample import resample, resample_labels, separate_z_axis  # noqa: E402
from kitsnet.data.synth import generate_case  # noqa: E402
from kitsnet.plan.planner import make_plan, target_shape  # noqa: E402
from kitsnet.predict.infer import logits_to_original  # noqa: E402
from kitsnet.preprocess.case import grid_spacing, normalize_ct, preprocess_image  # noqa: E402
from tests.reference.nnunet_plans import (  # noqa: E402
    DATA_KW,
    PROB_KW,
    SEG_KW,
    dataset_json,
    plans_manager,
)

pytestmark = pytest.mark.peer

REPO = Path(__file__).resolve().parents[2]
CASES = {"anisotropic": 0, "isotropic": 3}  # synth indices (seed 7): 2.5 mm and 1.5 mm slices


@pytest.fixture(scope="module")
def cases() -> dict[str, tuple[np.ndarray, np.ndarray, tuple[float, float, float]]]:
    return {name: generate_case(index, seed=7) for name, index in CASES.items()}


def _intensity_properties(image: np.ndarray, label: np.ndarray) -> dict:
    fg = image[label > 0].astype(np.float64)
    return {
        "mean": float(fg.mean()),
        "std": float(fg.std()),
        "percentile_00_5": float(np.percentile(fg, 0.5)),
        "percentile_99_5": float(np.percentile(fg, 99.5)),
        "min": float(fg.min()),
        "max": float(fg.max()),
        "n_samples": int(fg.size),
    }


def _plan(configuration: str, case) -> dict:
    image, label, spacing = case
    fp = {
        "shapes": [list(image.shape)],
        "spacings": [list(spacing)],
        "foreground_intensity": _intensity_properties(image, label),
    }
    cfg = yaml.safe_load((REPO / "config" / "kits21.yaml").read_text())
    return make_plan(configuration, fp, copy.deepcopy(cfg))


def test_ct_normalisation_matches_nnunet(cases) -> None:
    image, label, _ = cases["isotropic"]
    props = _intensity_properties(image, label)
    norm = {
        "clip": [props["percentile_00_5"], props["percentile_99_5"]],
        "mean": props["mean"],
        "std": props["std"],
    }
    ours = normalize_ct(image, norm)
    ref = CTNormalization(use_mask_for_norm=False, intensityproperties=props).run(image.copy())
    assert ours.dtype == ref.dtype == np.float32
    np.testing.assert_array_equal(ours, ref)


@pytest.mark.parametrize("configuration", ["2d", "3d_lowres", "3d_fullres"])
@pytest.mark.parametrize("case_name", list(CASES))
def test_preprocessing_of_a_case_matches_nnunet(cases, case_name, configuration) -> None:
    """3D plans resample to their spacing; the 2D plan's in-plane spacing only, each case keeping
    its slice spacing, which nnU-Net's preprocessor does for a configuration with two spacings."""
    image, label, spacing = cases[case_name]
    plan = _plan(configuration, cases[case_name])
    new_spacing = grid_spacing(plan, spacing)
    shape = target_shape(image.shape, list(spacing), new_spacing)
    img = preprocess_image(image, spacing, plan)
    seg = resample_labels(label, shape, spacing, plan["anisotropy_threshold"], new_spacing)
    if configuration == "2d":
        assert new_spacing == [spacing[0], *plan["spacing"]] and shape[0] == image.shape[0]

    pm = plans_manager(plan)
    ref_img, ref_seg, props = DefaultPreprocessor(verbose=False).run_case_npy(
        image[None].astype(np.float32),
        label[None].astype(np.int16),
        {"spacing": list(spacing)},
        pm,
        pm.get_configuration(configuration),
        dataset_json(),
    )
    # CT has no zero border, so nnU-Net's crop-to-nonzero keeps the whole image
    assert props["bbox_used_for_cropping"] == [[0, s] for s in image.shape]
    assert list(shape) == list(compute_new_shape(image.shape, spacing, new_spacing))
    assert img.shape == ref_img.shape and seg.shape == ref_seg.shape[1:]
    np.testing.assert_allclose(img, ref_img, rtol=0, atol=1e-5)
    # crop_to_nonzero marks voxels of exactly 0 HU connected to the border as -1 ("outside");
    # nnU-Net's training transforms map -1 to background (RemoveLabelTansform(-1, 0)).
    np.testing.assert_array_equal(seg, np.where(ref_seg[0] == -1, 0, ref_seg[0]))


def test_export_of_logits_matches_nnunet(cases) -> None:
    """Plan grid -> anisotropic original grid: order 1 in-plane, nearest across slices."""
    image, label, spacing = cases["anisotropic"]
    plan = _plan("3d_lowres", cases["anisotropic"])
    shape = target_shape(image.shape, list(spacing), plan["spacing"])
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((4, *shape)).astype(np.float32)
    geom = (plan["spacing"], plan["anisotropy_threshold"], spacing)
    ref = resample_data_or_seg_to_shape(logits, image.shape, plan["spacing"], spacing, **PROB_KW)
    np.testing.assert_array_equal(resample(logits, image.shape, 1, *geom, exact=True), ref)
    np.testing.assert_allclose(resample(logits, image.shape, 1, *geom), ref, rtol=0, atol=1e-5)
    geometry = {"original_shape": list(image.shape), "original_spacing": list(spacing)}
    _assert_same_labels_but_near_ties(logits_to_original(logits, geometry, plan), ref)


def _assert_same_labels_but_near_ties(labels: np.ndarray, ref_logits: np.ndarray) -> None:
    """Arg-max equal wherever nnU-Net's two largest logits differ by more than 1e-5."""
    top2 = np.sort(ref_logits, axis=0)[-2:]
    decided = top2[1] - top2[0] > 1e-5
    assert decided.mean() > 0.999
    np.testing.assert_array_equal(labels[decided], ref_logits.argmax(0)[decided])


@pytest.mark.parametrize(
    ("seed", "factor", "spacing"),
    [
        (0, 2.0, (1.0, 1.0, 1.0)),  # even factors: exact 0.5 ties at every boundary
        (1, 0.5, (1.0, 1.0, 1.0)),
        (2, 1.37, (1.0, 0.8, 0.8)),
        (3, 2.0, (5.0, 0.8, 0.8)),  # anisotropic: in-plane per slice, nearest along z
        (4, 0.71, (0.8, 2.5, 0.8)),  # coarse axis in the middle
    ],
)
def test_label_and_image_resampling_match_nnunet_on_random_labels(seed, factor, spacing) -> None:
    """Four labels meeting everywhere: the arg-max and tie-break rules, not just smooth blobs."""
    rng = np.random.default_rng(seed)
    seg = np.repeat(rng.integers(0, 4, (7, 9, 11)).astype(np.uint8), 2, axis=1)
    img = rng.standard_normal(seg.shape).astype(np.float32)
    new = [max(1, round(s * factor)) for s in seg.shape]
    new_sp = [sp * s / n for sp, s, n in zip(spacing, seg.shape, new, strict=True)]
    ours = resample_labels(seg, new, spacing, 3.0, new_spacing=new_sp)
    ref = resample_data_or_seg_to_shape(seg[None].astype(np.int16), new, spacing, new_sp, **SEG_KW)
    np.testing.assert_array_equal(ours, ref[0])
    ref_img = resample_data_or_seg_to_shape(img[None], new, spacing, new_sp, **DATA_KW)[0]
    exact = resample(img, new, 3, spacing, 3.0, new_spacing=new_sp, exact=True)
    np.testing.assert_array_equal(exact, ref_img)
    fast = resample(img, new, 3, spacing, 3.0, new_spacing=new_sp)
    np.testing.assert_allclose(fast, ref_img, rtol=0, atol=1e-5)


def test_separate_z_rule_matches_nnunet() -> None:
    spacings = [
        (1.0, 1.0, 1.0),
        (0.78125, 0.78125, 0.78125),
        (5.0, 0.8, 0.8),
        (2.4, 0.8, 0.8),  # ratio at the threshold (3): not anisotropic
        (2.5, 0.8, 0.8),
        (0.8, 0.8, 3.0),
        (0.24, 1.25, 1.25),  # two coarsest axes tie: no separate axis
        (1.99, 1.99, 1.99),
    ]
    for current, new in itertools.product(spacings, repeat=2):
        do_sep, axis = determine_do_sep_z_and_axis(None, current, new, 3.0)
        assert separate_z_axis(current, new, 3.0) == (axis if do_sep else None), (current, new)
