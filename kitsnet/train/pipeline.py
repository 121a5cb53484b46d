"""The training input pipeline: every batch a training run needs, made ahead of the step by
background workers.

A batch is sampled (:class:`kitsnet.train.loader.PatchSampler`: nnU-Net's boxes, a region larger
than the patch), augmented (:func:`kitsnet.train.augment.augment_batch`, plus the cascade's
previous-stage augmentation) and given its deep-supervision targets.  Why it is built this way:

- **Batch k is a function of (seed, fold, kind, epoch, index) only.**  Each batch draws from
  its own random streams, seeded from that key, so the sequence of batches is the same with 0,
  1 or 8 workers and after a resume, and nothing random needs checkpointing.  Batches are made
  single-threaded (workers are; the in-process path switches to one thread while it makes one)
  because torch's CPU reductions may round differently with another thread count.
- **Workers prefetch** (``torch.utils.data.DataLoader`` over the keys, in order): on a GPU the
  step never waits for the CPU while the workers keep up.  Labels travel as uint8 (8x fewer
  bytes than int64), through pinned memory with ``non_blocking`` copies to the GPU.
- **Where augmentation runs** (``training.augment_on``): ``workers`` augments on the CPU
  workers (the default on the CPU, where the step needs every core it has); ``device`` ships
  the sampled region and augments it on the training device with the batched torch transforms,
  which takes milliseconds on a GPU (the default there: no CPU worker count bounds the GPU).
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kitsnet.train.augment import augment_batch, cascade_binary_ops, remove_random_components
from kitsnet.train.loader import CaseStore, PatchSampler, augment_settings, region_size
from kitsnet.train.loss import downsample_target

TRAIN, VAL = "train", "val"
_KIND = {TRAIN: 0, VAL: 1}


@dataclass(frozen=True)
class BatchKey:
    """Which batch: ``kind`` (train/val), the epoch and its index within the epoch."""

    kind: str
    epoch: int
    index: int


def epoch_keys(epoch: int, start: int, n_train: int, n_val: int) -> list[BatchKey]:
    """The batches of one epoch in the order the loop consumes them: training from ``start``
    (a resumed epoch), then validation."""
    return [BatchKey(TRAIN, epoch, i) for i in range(start, n_train)] + [
        BatchKey(VAL, epoch, i) for i in range(n_val)
    ]


def default_workers(threads: int) -> int:
    """``training.workers: auto``: the job's CPUs less the one the step's process runs on (a
    one-CPU job makes its batches in process)."""
    return max(0, int(threads) - 1)


@contextlib.contextmanager
def _one_thread():
    """Make a batch with one torch thread (see the module docstring: same bytes everywhere)."""
    before = torch.get_num_threads()
    if before != 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if before != 1:
            torch.set_num_threads(before)


def ds_target_shapes(plan: dict) -> list[list[int]]:
    """The spatial size of each network output the loss weighs (highest resolution first):
    the patch over the cumulative strides, as :meth:`kitsnet.model.network.UNet.output_strides`."""
    arch = plan["arch"]
    patch = [int(p) for p in plan["patch_size"]]
    if not arch.get("deep_supervision", True):
        return [patch]
    shapes, cum = [], [1] * len(patch)
    for stride in arch["strides"][:-1]:
        cum = [c * int(s) for c, s in zip(cum, stride, strict=True)]
        shapes.append([p // c for p, c in zip(patch, cum, strict=True)])
    return shapes


class InputPipeline:
    """Makes the batches of one training run (one configuration and fold).

    Picklable: the memory maps are opened lazily in each process that makes batches.
    ``augment_in_workers`` False leaves training batches unaugmented, with the seed for
    :meth:`finish` to augment them on the device.
    """

    def __init__(
        self,
        plan: dict,
        training: dict,
        augmentation: dict,
        split: dict,
        data_dir: str | Path,
        prev_dirs: list[str | Path] | None = None,
        seed: int = 0,
        fold: int = 0,
        augment_in_workers: bool = True,
    ):
        self.dim = int(plan["arch"]["dim"])
        self.patch = [int(p) for p in plan["patch_size"]]
        self.region = region_size(self.patch, augmentation, self.dim)
        self.batch = int(plan["batch_size"])
        self.n_prev = plan["num_classes"] - 1 if plan.get("previous_stage") else 0
        # a ROI configuration trains on the crops of its cases (kitsnet.preprocess.roi)
        self.cropped = bool(plan.get("roi"))
        self.oversample = float(training["oversample_foreground"])
        self.augmentation = augmentation
        self.aug = augment_settings(augmentation, self.dim)
        self.ds_shapes = ds_target_shapes(plan)
        self.cases = {TRAIN: list(split["train"]), VAL: list(split["val"])}
        self.data_dir = Path(data_dir)
        self.prev_dirs = [Path(d) for d in prev_dirs] if prev_dirs else None
        self.seed, self.fold = int(seed), int(fold)
        self.augment_in_workers = bool(augment_in_workers)
        self._stores: dict[str, CaseStore] | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_stores": None}

    def store(self, kind: str) -> CaseStore:
        if self._stores is None:
            self._stores = {
                k: CaseStore(cases, self.data_dir, self.prev_dirs, self.cropped)
                for k, cases in self.cases.items()
            }
        return self._stores[kind]

    def streams(self, key: BatchKey) -> tuple[np.random.Generator, int]:
        """The batch's numpy stream (sampling) and torch seed (augmentation)."""
        seq = np.random.SeedSequence([self.seed, self.fold, _KIND[key.kind], key.epoch, key.index])
        sampling, augmenting = seq.spawn(2)
        return np.random.default_rng(sampling), int(augmenting.generate_state(1, np.uint64)[0] >> 1)

    def make(self, key: BatchKey) -> dict:
        """One batch: ``image`` float32 (B, C, ...), ``targets`` uint8 (B, 1, ...) per weighted
        output; an unaugmented training batch has ``seg`` (the region's labels) and ``seed``
        instead of ``targets``."""
        rng, torch_seed = self.streams(key)
        train = key.kind == TRAIN
        region = self.region if train else self.patch
        with _one_thread():
            sampler = PatchSampler(
                self.store(key.kind), region, self.patch, self.dim, self.oversample, rng
            )
            img, seg = sampler.sample(self.batch, self.n_prev)
            image, labels = torch.from_numpy(img), torch.from_numpy(seg)
            if train and not self.augment_in_workers:
                return {"image": image, "seg": labels, "seed": torch_seed}
            if train:
                image, labels = self.augment(
                    image, labels, torch.Generator().manual_seed(torch_seed)
                )
            return {"image": image, "targets": self.targets(labels)}

    def augment(self, image: torch.Tensor, seg: torch.Tensor, gen: torch.Generator):
        """nnU-Net's training transforms, then (cascade) the previous-stage augmentation."""
        image, seg = augment_batch(
            image, seg, self.patch, self.aug, gen, n_intensity_channels=image.shape[1] - self.n_prev
        )
        if self.n_prev:
            image[:, -self.n_prev :] = augment_previous_stage(
                image[:, -self.n_prev :], self.augmentation, gen
            )
        return image, seg

    def targets(self, seg: torch.Tensor) -> list[torch.Tensor]:
        return [downsample_target(seg, shape) for shape in self.ds_shapes]

    def finish(self, batch: dict, dev: torch.device) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The batch on ``dev`` (non-blocking copies), augmented there if the workers did not."""
        image = batch["image"].to(dev, non_blocking=True)
        if "targets" in batch:
            return image, [t.to(dev, non_blocking=True) for t in batch["targets"]]
        seg = batch["seg"].to(dev, non_blocking=True)
        gen = torch.Generator(device=dev).manual_seed(batch["seed"])
        image, seg = self.augment(image, seg, gen)
        return image, self.targets(seg)


class _Keyed(torch.utils.data.Dataset):
    """A map-style dataset over batch keys, so the DataLoader returns them in order."""

    def __init__(self, pipeline: InputPipeline, keys: list[BatchKey]):
        self.pipeline, self.keys = pipeline, keys

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> dict:
        return self.pipeline.make(self.keys[i])


def _worker_init(_: int) -> None:
    """One thread per worker.  SLURM signals every process of a job, and the training process
    must checkpoint before its workers go, so a worker outlives the first SIGTERM: it ends when
    the training process stops it (:meth:`BatchStream.close`) or dies, at a second SIGTERM, or
    60 s after the first (so an unclosed stream cannot hang the exit)."""

    def on_term(signum, frame):
        if signal.getitimer(signal.ITIMER_REAL)[0] > 0:  # second SIGTERM
            os._exit(0)
        signal.signal(signal.SIGALRM, lambda *_: os._exit(0))
        signal.setitimer(signal.ITIMER_REAL, 60.0)

    signal.signal(signal.SIGTERM, on_term)
    torch.set_num_threads(1)


class BatchStream:
    """The batches of a list of keys, in order; ``close()`` (or ``with``) stops the workers
    at once, also when training stops with an exception."""

    def __init__(self, pipeline: InputPipeline, keys: list[BatchKey], workers: int, pin: bool):
        self._loader = None
        if workers <= 0:
            self._it = (pipeline.make(k) for k in keys)
            return
        self._loader = torch.utils.data.DataLoader(
            _Keyed(pipeline, keys),
            batch_size=None,
            shuffle=False,
            num_workers=int(workers),
            pin_memory=pin,
            prefetch_factor=2,
            worker_init_fn=_worker_init,
            # fork: workers only read memory-mapped arrays; no CUDA is touched in them
            multiprocessing_context="fork" if os.name == "posix" else None,
        )
        self._it = iter(self._loader)

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        return next(self._it)

    def close(self) -> None:
        shutdown = getattr(self._it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        self._it = iter(())

    def __enter__(self) -> BatchStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def batches(
    pipeline: InputPipeline, keys: Iterable[BatchKey], workers: int, pin_memory: bool = False
) -> BatchStream:
    """The batches of ``keys`` in order, made by ``workers`` processes (0: in this one)."""
    return BatchStream(pipeline, list(keys), int(workers), pin_memory)


def augment_previous_stage(onehot: torch.Tensor, aug: dict, gen: torch.Generator) -> torch.Tensor:
    """nnU-Net's cascade augmentation of the lowres segmentation channels: random binary
    morphology and random removal of small connected components, so the fullres network learns
    not to trust the previous stage blindly."""
    onehot = cascade_binary_ops(
        onehot,
        gen,
        p=aug.get("cascade_binary_p", 0.4),
        p_per_label=aug.get("cascade_binary_p_per_label", 0.5),
        radius=aug.get("cascade_binary_radius", (1, 8)),
    )
    return remove_random_components(
        onehot,
        gen,
        p=aug.get("cascade_cc_removal_p", 0.2),
        p_per_label=aug.get("cascade_cc_p_per_label", 0.5),
        max_fraction=aug.get("cascade_cc_max_fraction", 0.15),
    )
