"""Inputs shared by the CPU benchmarks: a CT-like volume, plans, and nnU-Net's view of them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage

LABELS = {"background": 0, "kidney": 1, "tumor": 2, "cyst": 3}
FULLRES = [0.78125, 0.78125, 0.78125]  # the paper's grids (config/kits21.yaml)
LOWRES = [1.99, 1.99, 1.99]
NORMALIZATION = {"clip": [-79.0, 304.0], "mean": 101.0, "std": 76.9}  # KiTS21-like HU figures
# nnU-Net's ExperimentPlanner defaults for every configuration
DATA_KW = {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None}
SEG_KW = {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None}
PROB_KW = {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None}


def peer_available() -> str | None:
    """None when nnU-Net v2 can be imported, else why not."""
    try:
        import nnunetv2  # noqa: F401
    except ImportError as exc:
        return f"nnunetv2 is not installed (pip install -e '.[peer]'): {exc}"
    return None


def ct_volume(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """A smooth CT-like float32 volume in HU (air, soft tissue, contrast-enhanced blobs).

    Smooth structure at several scales so resampling errors are representative; built at a
    quarter resolution and zoomed up so that making a 200 x 512 x 512 volume takes ~1 s.
    """
    rng = np.random.default_rng(seed)
    small = [max(4, s // 4) for s in shape]
    coarse = ndimage.gaussian_filter(rng.standard_normal(small), 1.5) * 400 + 40
    vol = ndimage.zoom(coarse, [s / c for s, c in zip(shape, small, strict=True)], order=1)
    vol = vol[: shape[0], : shape[1], : shape[2]].astype(np.float32)
    vol += rng.standard_normal(vol.shape, dtype=np.float32) * 20
    return np.clip(vol, -1024, 2000)


def nnunet_architecture(arch: dict) -> dict:
    """A kitsnet plan's ``arch`` as nnU-Net's planner writes ``configurations[c]['architecture']``
    (its PlainConvUNet with the same stages, kernels, strides and norm); used wherever nnU-Net
    must build the same network: the benchmarks and tests/test_network_nnunet.py."""
    dim, n = arch["dim"], len(arch["features_per_stage"])
    return {
        "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
        "arch_kwargs": {
            "n_stages": n,
            "features_per_stage": arch["features_per_stage"],
            "conv_op": f"torch.nn.modules.conv.Conv{dim}d",
            "kernel_sizes": arch["kernel_sizes"],
            "strides": arch["strides"],
            "n_conv_per_stage": [arch["n_conv_per_stage"]] * n,
            "n_conv_per_stage_decoder": [arch["n_conv_per_stage_decoder"]] * (n - 1),
            "conv_bias": True,
            "norm_op": f"torch.nn.modules.instancenorm.InstanceNorm{dim}d",
            "norm_op_kwargs": {"eps": 1e-5, "affine": True},
            "dropout_op": None,
            "dropout_op_kwargs": None,
            "nonlin": "torch.nn.LeakyReLU",
            "nonlin_kwargs": {"inplace": True},
        },
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
    }


def kitsnet_plan(spacing: list[float]) -> dict:
    """The parts of a kitsnet plan that preprocessing and export read."""
    return {"spacing": spacing, "normalization": NORMALIZATION, "anisotropy_threshold": 3.0}


def nnunet_plans_manager(configuration: str, spacing: list[float]):
    """nnU-Net's PlansManager for one configuration with the same grid and CT statistics,
    and nnU-Net's ExperimentPlanner default resampling settings."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    props = {
        "mean": NORMALIZATION["mean"],
        "std": NORMALIZATION["std"],
        "percentile_00_5": NORMALIZATION["clip"][0],
        "percentile_99_5": NORMALIZATION["clip"][1],
    }
    plans = {
        "dataset_name": "Dataset000_Bench",
        "plans_name": "nnUNetPlans",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "foreground_intensity_properties_per_channel": {"0": props},
        "configurations": {
            configuration: {
                "spacing": spacing,
                "patch_size": [128, 128, 128],
                "normalization_schemes": ["CTNormalization"],
                "use_mask_for_norm": [False],
                "resampling_fn_data": "resample_data_or_seg_to_shape",
                "resampling_fn_data_kwargs": DATA_KW,
                "resampling_fn_seg": "resample_data_or_seg_to_shape",
                "resampling_fn_seg_kwargs": SEG_KW,
                "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
                "resampling_fn_probabilities_kwargs": PROB_KW,
                "architecture": {},
            }
        },
    }
    return PlansManager(plans)


def deep_supervision_scales(patch: int, n_stages: int) -> list[float]:
    """Deep-supervision output scales of an ``n_stages`` network on an isotropic ``patch``
    (strides 2 while >= 8 voxels): nnU-Net's ``_get_deep_supervision_scales``, 1 / cumprod of
    the pooling kernels with the last one dropped."""
    scales, size = [1.0], patch
    for _ in range(n_stages - 2):
        if size >= 8:
            size //= 2
        scales.append(size / patch)
    return scales


def nnunet_numpy_dataset(folder, cases: list[str], copy_on_write: bool = False):
    """nnU-Net's ``nnUNetDatasetNumpy`` over ``folder``; with ``copy_on_write`` its arrays are
    memory-mapped copy-on-write (``mmap_mode='c'``) instead of read-only.

    Why: nnU-Net 2.8.1's loader crops with ``crop_and_pad_nd``, which returns a *view* of the
    memory map when the region lies wholly inside the image, and ``.float()`` of float32 data
    does not copy; its transforms then write into that view in place (e.g. the Gaussian noise's
    ``index_add_``), which on a read-only map is a segmentation fault.  nnU-Net's default
    Blosc2 dataset decompresses into fresh arrays, so this only bites the ``.npy`` layout with
    cases larger than the sampled region; a private (copy-on-write) map makes those in-place
    writes land in private pages, as a copy would."""
    from batchgenerators.utilities.file_and_folder_operations import load_pickle
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetNumpy

    if not copy_on_write:
        return nnUNetDatasetNumpy(str(folder), list(cases))

    class CopyOnWriteNumpyDataset(nnUNetDatasetNumpy):
        def load_case(self, identifier):
            root = Path(self.source_folder)
            data = np.load(root / f"{identifier}.npy", mmap_mode="c")
            seg = np.load(root / f"{identifier}_seg.npy", mmap_mode="c")
            return data, seg, None, load_pickle(str(root / f"{identifier}.pkl"))

    return CopyOnWriteNumpyDataset(str(folder), list(cases))


def nnunet_training_loader(
    folder,
    cases: list[str],
    patch: int,
    batch_size: int,
    n_stages: int,
    oversample: float,
    copy_on_write: bool = False,
):
    """nnU-Net's training ``nnUNetDataLoader`` over an ``nnUNetDatasetNumpy`` folder, with the
    transforms of ``nnUNetTrainer.get_training_transforms`` built with the arguments
    ``nnUNetTrainer`` derives for a 3D isotropic patch: rotation +-30 degrees, the initial
    (enlarged) patch of ``get_patch_size``, mirror axes (0, 1, 2), no dummy 2D, the
    deep-supervision scales of the ``n_stages`` network and KiTS21's labels.  ``copy_on_write``:
    see :func:`nnunet_numpy_dataset`."""
    from nnunetv2.training.data_augmentation.compute_initial_patch_size import get_patch_size
    from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    patch_size = (patch,) * 3
    # nnUNetTrainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size, 3D isotropic
    rotation = (-30.0 / 360 * 2 * np.pi, 30.0 / 360 * 2 * np.pi)
    initial = get_patch_size(patch_size, rotation, rotation, rotation, (0.85, 1.25))
    scales = [[s] * 3 for s in deep_supervision_scales(patch, n_stages)]
    labels = LabelManager(LABELS, regions_class_order=None)
    transforms = nnUNetTrainer.get_training_transforms(
        patch_size,
        rotation,
        scales,
        (0, 1, 2),
        False,
        use_mask_for_norm=[False],
        is_cascaded=False,
        foreground_labels=labels.foreground_labels,
        regions=None,
        ignore_label=labels.ignore_label,
    )
    dataset = nnunet_numpy_dataset(folder, cases, copy_on_write)
    return nnUNetDataLoader(
        dataset,
        batch_size,
        initial,
        patch_size,
        labels,
        oversample_foreground_percent=oversample,
        transforms=transforms,
    )
