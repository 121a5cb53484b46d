"""A kitsnet plan as nnU-Net v2 sees it: the one translation shared by tests and benchmarks.

nnU-Net builds its preprocessing, network, label handling and sliding window from a plans file
and a dataset.json.  A cross-check or a benchmark compares like with like only if nnU-Net gets
the grid, CT statistics, resampling settings, topology and weights that the kitsnet plan holds,
so every comparison takes them from here instead of writing its own plans dict; the same goes
for nnU-Net's training data loader, set up as its trainer sets it up for such a plan.  nnunetv2
is imported inside the functions: this module imports without the ``peer`` extra.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from kitsnet.data.dataset import LABELS

# nnU-Net's ExperimentPlanner defaults for every configuration's resampling functions
DATA_KW = {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None}
SEG_KW = {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None}
PROB_KW = {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None}
RESAMPLING = "resample_data_or_seg_to_shape"
#: KiTS21's labels as a dataset.json names them (name -> value)
NNUNET_LABELS = {name: value for value, name in LABELS.items()}


def dataset_json(num_training: int = 1) -> dict[str, Any]:
    """The dataset.json of a one-channel CT dataset with KiTS21's labels."""
    return {
        "channel_names": {"0": "CT"},
        "labels": NNUNET_LABELS,
        "numTraining": num_training,
        "file_ending": ".nii.gz",
    }


def intensity_properties(normalization: dict[str, Any]) -> dict[str, float]:
    """A plan's CT normalisation as nnU-Net's foreground intensity properties (what its
    ``CTNormalization`` reads: the clip percentiles, mean and std)."""
    return {
        "mean": normalization["mean"],
        "std": normalization["std"],
        "percentile_00_5": normalization["clip"][0],
        "percentile_99_5": normalization["clip"][1],
    }


def nnunet_architecture(arch: dict[str, Any]) -> dict[str, Any]:
    """A plan's ``arch`` as nnU-Net's planner writes ``configurations[c]['architecture']``: its
    PlainConvUNet with the same stages, kernels, strides, convolutions and instance norm."""
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


def nnunet_configuration(plan: dict[str, Any]) -> dict[str, Any]:
    """``configurations[plan['configuration']]`` of nnU-Net's plans: the plan's grid, patch,
    batch and network, CT normalisation and the planner's default resampling.  A partial plan
    (no ``arch``, batch or median shape, as the preprocessing benchmarks make) leaves those out:
    nnU-Net reads them only to train."""
    configuration = {
        "data_identifier": f"nnUNetPlans_{plan['configuration']}",
        "preprocessor_name": "DefaultPreprocessor",
        "spacing": plan["spacing"],
        "patch_size": list(plan["patch_size"]),
        "normalization_schemes": ["CTNormalization"],
        "use_mask_for_norm": [False],
        "resampling_fn_data": RESAMPLING,
        "resampling_fn_data_kwargs": DATA_KW,
        "resampling_fn_seg": RESAMPLING,
        "resampling_fn_seg_kwargs": SEG_KW,
        "resampling_fn_probabilities": RESAMPLING,
        "resampling_fn_probabilities_kwargs": PROB_KW,
        "architecture": nnunet_architecture(plan["arch"]) if "arch" in plan else {},
    }
    optional = {"batch_size": "batch_size", "batch_dice": "batch_dice"}
    optional["median_image_size_in_voxels"] = "median_shape"
    configuration.update({k: plan[v] for k, v in optional.items() if v in plan})
    return configuration


def nnunet_plans(plan: dict[str, Any]) -> dict[str, Any]:
    """nnU-Net's plans dict with the one configuration ``plan`` describes (no transposition:
    kitsnet keeps nibabel's axis order, slices first)."""
    plans = {
        "dataset_name": "Dataset000_kitsnet",
        "plans_name": "nnUNetPlans",
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {
            "0": intensity_properties(plan["normalization"])
        },
        "configurations": {plan["configuration"]: nnunet_configuration(plan)},
    }
    if "median_shape" in plan:
        plans["original_median_shape_after_transp"] = plan["median_shape"]
        plans["original_median_spacing_after_transp"] = plan["spacing"]
    return plans


def plans_manager(plan: dict[str, Any]):
    """nnU-Net's ``PlansManager`` of :func:`nnunet_plans`."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    return PlansManager(nnunet_plans(plan))


def nnunet_network(
    architecture: dict[str, Any],
    in_channels: int,
    num_classes: int,
    deep_supervision: bool | None = None,
    allow_init: bool = True,
):
    """nnU-Net's network from a plans ``architecture`` entry, as its trainer builds it
    (``get_network_from_plans``)."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    return get_network_from_plans(
        architecture["network_class_name"],
        dict(architecture["arch_kwargs"]),
        architecture["_kw_requires_import"],
        in_channels,
        num_classes,
        allow_init=allow_init,
        deep_supervision=deep_supervision,
    )


def is_alias(key: str) -> bool:
    """nnU-Net registers each layer twice (``all_modules`` and ``decoder.encoder`` aliases of
    the same tensors); only the remaining state-dict keys correspond to kitsnet's."""
    return "all_modules" in key or key.startswith("decoder.encoder.")


def without_aliases(state_dict: dict[str, Any]) -> dict[str, Any]:
    """An nnU-Net network's state dict with kitsnet's keys only (loads strictly into ours)."""
    return {k: v for k, v in state_dict.items() if not is_alias(k)}


def load_kitsnet_weights(network, state_dict: dict[str, Any]) -> None:
    """Load a kitsnet network's weights into nnU-Net's ``network``; every key must be used
    and every non-alias key of nnU-Net's set, so both then compute the same function."""
    missing, unexpected = network.load_state_dict(state_dict, strict=False)
    left = [k for k in missing if not is_alias(k)]
    if left or unexpected:
        raise ValueError(f"weights do not map onto nnU-Net: missing {left}, extra {unexpected}")


def cpu_predictor(network, patch: list[int], inference: dict[str, Any]):
    """nnU-Net's ``nnUNetPredictor`` on the CPU running ``network`` with a plan's patch and the
    inference settings (tile step, mirroring over every axis; its Gaussian's sigma is always
    patch / 8, kitsnet's ``gaussian_sigma_scale`` 0.125), no progress bar."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.label_handling.label_handling import LabelManager
    from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager

    predictor = nnUNetPredictor(
        tile_step_size=float(inference["step_size"]),
        use_gaussian=True,
        use_mirroring=bool(inference["mirror"]),
        perform_everything_on_device=False,  # what it switches to on a CPU device anyway
        device=torch.device("cpu"),
        allow_tqdm=False,
    )
    predictor.network = network
    predictor.configuration_manager = ConfigurationManager(
        {"patch_size": list(patch), "architecture": {}}
    )
    predictor.label_manager = LabelManager(NNUNET_LABELS, None)
    predictor.allowed_mirroring_axes = tuple(range(len(patch)))
    return predictor


def deep_supervision_scales(strides: list[list[int]]) -> list[list[float]]:
    """nnU-Net's ``_get_deep_supervision_scales``: 1 / the cumulative pooling of each output,
    the lowest output dropped."""
    scales, cumulative = [], [1] * len(strides[0])
    for stride in strides[:-1]:
        cumulative = [c * s for c, s in zip(cumulative, stride, strict=True)]
        scales.append([1 / c for c in cumulative])
    return scales


def numpy_dataset(folder: Path, cases: list[str], copy_on_write: bool = False):
    """nnU-Net's ``nnUNetDatasetNumpy`` over ``folder``; with ``copy_on_write`` its arrays are
    memory-mapped copy-on-write (``mmap_mode='c'``) instead of read-only.

    Why: nnU-Net 2.8.1's loader crops with ``crop_and_pad_nd``, which returns a *view* of the
    memory map when the region lies wholly inside the image, and its transforms then write into
    that view in place (e.g. the Gaussian noise's ``index_add_``): on a read-only map, a
    segmentation fault.  Its default Blosc2 dataset decompresses into fresh arrays, so only the
    ``.npy`` layout with cases larger than the sampled region is hit."""
    from batchgenerators.utilities.file_and_folder_operations import load_pickle
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetNumpy

    if not copy_on_write:
        return nnUNetDatasetNumpy(str(folder), list(cases))

    class CopyOnWriteNumpyDataset(nnUNetDatasetNumpy):
        def load_case(self, identifier: str):
            root = Path(self.source_folder)
            data = np.load(root / f"{identifier}.npy", mmap_mode="c")
            seg = np.load(root / f"{identifier}_seg.npy", mmap_mode="c")
            return data, seg, None, load_pickle(str(root / f"{identifier}.pkl"))

    return CopyOnWriteNumpyDataset(str(folder), list(cases))


def training_loader(
    folder: Path,
    cases: list[str],
    plan: dict[str, Any],
    oversample: float,
    copy_on_write: bool = False,
):
    """nnU-Net's training ``nnUNetDataLoader`` over an ``nnUNetDatasetNumpy`` folder for a 3D
    isotropic plan (its ``patch_size``, ``batch_size`` and ``arch['strides']``), with the
    transforms of ``nnUNetTrainer.get_training_transforms`` built with the arguments its trainer
    derives: rotation +-30 degrees, the enlarged initial patch of ``get_patch_size``, mirror axes
    (0, 1, 2), no dummy 2D, the network's deep-supervision scales and KiTS21's labels."""
    from nnunetv2.training.data_augmentation.compute_initial_patch_size import get_patch_size
    from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    patch_size = tuple(int(p) for p in plan["patch_size"])
    # nnUNetTrainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size, 3D isotropic
    rotation = (-30.0 / 360 * 2 * np.pi, 30.0 / 360 * 2 * np.pi)
    initial = get_patch_size(patch_size, rotation, rotation, rotation, (0.85, 1.25))
    labels = LabelManager(NNUNET_LABELS, regions_class_order=None)
    transforms = nnUNetTrainer.get_training_transforms(
        patch_size,
        rotation,
        deep_supervision_scales(plan["arch"]["strides"]),
        (0, 1, 2),
        False,
        use_mask_for_norm=[False],
        is_cascaded=False,
        foreground_labels=labels.foreground_labels,
        regions=None,
        ignore_label=labels.ignore_label,
    )
    dataset = numpy_dataset(folder, cases, copy_on_write)
    return nnUNetDataLoader(
        dataset,
        int(plan["batch_size"]),
        initial,
        patch_size,
        labels,
        oversample_foreground_percent=oversample,
        transforms=transforms,
    )


def nnunet_case(kitsnet_files: list[Path], folder: Path, case: str) -> None:
    """A kitsnet-preprocessed case (image, labels, json) in ``folder`` as nnU-Net's
    DefaultPreprocessor writes it for ``nnUNetDatasetNumpy``: the image a relative symlink (the
    same bytes for both sides), the labels (1, *S) int8, ``<case>.pkl`` with the class
    locations as (N, 4) arrays (a leading channel coordinate)."""
    from kitsnet.core.io import load_json

    image_file, seg_file, json_file = kitsnet_files
    os.symlink(os.path.relpath(image_file, folder), Path(folder) / f"{case}.npy")
    seg = np.load(seg_file, mmap_mode="r")
    np.save(Path(folder) / f"{case}_seg.npy", seg[None].astype(np.int8))
    props = load_json(json_file)
    locs = {
        int(k): np.array([[0, *c] for c in v], dtype=np.int64).reshape(-1, 4)
        for k, v in props["class_locations"].items()
    }
    with open(Path(folder) / f"{case}.pkl", "wb") as fh:
        pickle.dump({"class_locations": locs, "spacing": props["spacing"], "shape": seg.shape}, fh)
