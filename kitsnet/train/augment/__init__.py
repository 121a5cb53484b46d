"""nnU-Net's default training augmentation, batched in torch so it runs where the batch lives.

This package owns everything that randomly changes a training batch after the loader has sampled
it: the per-batch transforms of nnU-Net's trainer and the cascade's perturbations of the
previous stage.  It depends on nothing else in kitsnet (numpy, scipy and torch only), so the
loader, the training pipeline and the benchmarks can all call it.

nnU-Net augments each case on CPU worker processes while the GPU waits; here one call
augments a whole batch with tensor ops (``grid_sample``, shifted-view sums, max-pooling), so
the same code runs on CPU and GPU.  On one CPU core, sampling plus augmentation makes
patches more than twice as fast as nnU-Net's loader and transforms
(``python -m benchmarks --only augment``).  Each transform touches only the samples nnU-Net's
probabilities pick, in place, and costly primitives are replaced by cheaper equivalents that
give the same values up to float rounding (see :func:`.spatial._box_grid`,
:func:`.intensity._blur_axis`, :func:`.intensity._stats`).

The transforms, their order and their probabilities follow nnU-Net v2's
``nnUNetTrainer.get_training_transforms`` (batchgeneratorsv2): spatial (rotation, scaling, centre
crop), Gaussian noise, Gaussian blur, multiplicative brightness, contrast, simulated low
resolution, inverted gamma, gamma, mirroring.  Every probability is per sample, as in nnU-Net,
and all randomness comes from one ``torch.Generator`` so a seed reproduces a batch exactly.

Differences from nnU-Net, on purpose: the segmentation is resampled with nearest neighbour
(nnU-Net 2.8 interpolates each label linearly and takes the arg-max), and the cascade's
morphology uses iterated max-pooling (an approximate ball) instead of an FFT convolution with an
exact ball.  Both are augmentations whose exact shape does not matter, and both are cheap on GPU.

Modules, one per reason to change: :mod:`.config` (the settings and nnU-Net's defaults),
:mod:`.draws` (how random numbers are drawn, which fixes what a seed reproduces),
:mod:`.spatial` (rotation, scaling, cropping), :mod:`.intensity` (the intensity transforms),
:mod:`.batch` (the order in which a batch goes through them, plus mirroring) and
:mod:`.cascade` (perturbing the previous stage's segmentation for the cascade).
"""

from kitsnet.train.augment.batch import augment_batch
from kitsnet.train.augment.cascade import cascade_binary_ops, remove_random_components
from kitsnet.train.augment.config import DEFAULTS, default_config

__all__ = [
    "DEFAULTS",
    "augment_batch",
    "cascade_binary_ops",
    "default_config",
    "remove_random_components",
]
