"""Training loop: patch sampling with foreground oversampling, CE + Dice with deep supervision,
SGD with a poly schedule, per-epoch logging, checkpoints and resume.

Every number comes from the plan (patch, batch, network) or the ``training`` / ``augmentation``
sections of the config.

Checkpoints and resume.  Every ``checkpoint_every`` epochs (and at the last) the whole training
state -- model, optimiser, RNG states, logged history, EMA, the best model's weights -- goes to
``checkpoint_latest.pt``, written under a temporary name, flushed and renamed; the checkpoint it
replaces is kept as ``checkpoint_previous.pt``.  A job restarted after a kill at any moment
resumes from the newest checkpoint that loads (a truncated or unreadable one is reported and
the previous one used), so the epoch count and the history have no gap and no repeat, and on
the CPU the resumed run is bit-identical to an uninterrupted one.  A checkpoint made with other
settings or other input data is not resumed: training starts over.  On SIGTERM (SLURM
preemption, ``scancel``) the current iteration finishes, a checkpoint of the exact position
inside the epoch is written and the job exits with :class:`TrainingInterrupted`; the rerun
continues from that iteration.  ``model_final.pt`` and ``model_best.pt`` are written at the end.

Test hook: ``KITSNET_FAULT=POINT[:key=value,...]`` makes training kill itself (SIGKILL, or the
signal named by ``signal=TERM``) at POINT: ``after_iteration`` (keys ``epoch``, ``iteration``),
``during_checkpoint_write`` (``epoch``; half of the checkpoint's bytes written) or
``between_epochs`` (``epoch``; after that epoch's log and checkpoint).  See
tests/test_fault_injection.py.  Without the variable the hook does nothing.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io as _io
import json
import math
import os
import signal
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .augment import augment_batch, cascade_binary_ops, remove_random_components
from .io import KitsnetError, atomic_path, load_json, remove_stale_temporaries
from .network import build_network

_CASE_FILES = ("_image.npy", "_seg.npy", ".json")
LOG_COLUMNS = [
    "epoch",
    "train_loss",
    "val_loss",
    "pseudo_dice",
    "ema_pseudo_dice",
    "lr",
    "epoch_time_s",
]


# ----------------------------------------------------------------------------- data
class CaseStore:
    """Memory-mapped preprocessed cases (+ optional previous-stage segmentations)."""

    def __init__(self, cases: list[str], data_dir: Path, prev_dirs: list[Path] | None = None):
        self.cases = list(cases)
        self.image = {c: np.load(data_dir / f"{c}_image.npy", mmap_mode="r") for c in cases}
        self.seg = {c: np.load(data_dir / f"{c}_seg.npy", mmap_mode="r") for c in cases}
        self.locs = {
            c: {
                int(k): np.asarray(v, dtype=np.int64).reshape(-1, 3)
                for k, v in load_json(data_dir / f"{c}.json")["class_locations"].items()
            }
            for c in cases
        }
        self.prev = None
        if prev_dirs:
            self.prev = {
                c: np.load(find_previous_stage(c, prev_dirs), mmap_mode="r") for c in cases
            }


def find_previous_stage(case: str, prev_dirs: list[str | Path]) -> Path:
    """The previous stage's segmentation of ``case``: exactly one fold predicted it."""
    hits = [Path(d) / f"{case}.npy" for d in prev_dirs if (Path(d) / f"{case}.npy").is_file()]
    if len(hits) != 1:
        raise KitsnetError(
            f"{case}: expected one previous-stage segmentation in {prev_dirs}, found {len(hits)}"
        )
    return hits[0]


def _crop(
    arr: np.ndarray,
    lb: np.ndarray,
    size: tuple[int, ...],
    fill: float,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Crop ``arr[..., lb:lb+size]`` over the trailing len(size) axes, padding with ``fill``.

    With ``out`` (shape ``(*lead, *size)``, any dtype the values cast to) the crop is written
    there, converted on the fly, and returned: the sampler fills its batch arrays in place, one
    pass over each voxel.  Only the part of the box outside ``arr`` is set to ``fill``.
    """
    lead = arr.shape[: arr.ndim - len(size)]
    spatial = arr.shape[arr.ndim - len(size) :]
    if out is None:
        out = np.empty((*lead, *size), dtype=arr.dtype)
    src, dst = [], []
    for lo, sz, full in zip(lb, size, spatial, strict=True):
        a, b = max(lo, 0), min(lo + sz, full)
        src.append(slice(a, max(a, b)))
        dst.append(slice(a - lo, a - lo + max(0, b - a)))
    np.copyto(out[(..., *dst)], arr[(..., *src)])
    # The padding: per axis, the slabs before and after the copied span (inside the span on the
    # axes before it, everything on the axes after it), which tile the rest of the box.
    for axis, (d, sz) in enumerate(zip(dst, size, strict=True)):
        rest = (slice(None),) * (len(size) - axis - 1)
        out[(..., *dst[:axis], slice(0, d.start), *rest)] = fill
        out[(..., *dst[:axis], slice(d.stop, sz), *rest)] = fill
    return out


class PatchSampler:
    """Samples (image, seg) patches like nnU-Net: the last third of a batch forced to foreground.

    For 2D plans a random slice along axis 0 is taken and the patch is 2D in-plane.
    """

    def __init__(
        self,
        store: CaseStore,
        patch_in: list[int],
        dim: int,
        oversample: float,
        rng: np.random.Generator,
    ):
        self.store, self.patch_in, self.dim = store, list(patch_in), dim
        self.oversample, self.rng = oversample, rng

    def _box(self, case: str, force_fg: bool) -> tuple[np.ndarray, tuple[int, ...]]:
        shape = np.array(self.store.seg[case].shape)
        size = np.array([1, *self.patch_in] if self.dim == 2 else self.patch_in)
        locs = {k: v for k, v in self.store.locs[case].items() if len(v)}
        if force_fg and locs:
            cls = sorted(locs)[self.rng.integers(len(locs))]
            centre = locs[cls][self.rng.integers(len(locs[cls]))]
            lb = centre - size // 2
        else:
            hi = np.maximum(shape - size, 0)
            lo = np.minimum(shape - size, 0) // 2
            lb = np.array([self.rng.integers(a, b + 1) for a, b in zip(lo, hi, strict=True)])
        return lb, tuple(int(s) for s in size)

    def sample(self, batch_size: int, n_prev: int) -> tuple[np.ndarray, np.ndarray]:
        """A batch (float32 image channels [+ previous-stage one-hot], int64 labels).

        Each crop is written straight into the batch arrays, converting while copying, so every
        voxel of the (enlarged) patch is read from the memory map and written exactly once.
        """
        n_forced_from = round(batch_size * (1 - self.oversample))
        boxes = []
        for i in range(batch_size):
            case = self.store.cases[self.rng.integers(len(self.store.cases))]
            boxes.append((case, *self._box(case, force_fg=i >= n_forced_from)))
        size = boxes[0][2]
        n_img = self.store.image[boxes[0][0]].shape[0]
        images = np.empty((batch_size, n_img + n_prev, *size), np.float32)
        segs = np.empty((batch_size, 1, *size), np.int64)
        for i, (case, lb, _) in enumerate(boxes):
            _crop(self.store.image[case], lb, size, 0.0, out=images[i, :n_img])
            _crop(self.store.seg[case], lb, size, 0, out=segs[i, 0])
            if self.store.prev is not None:
                prev = _crop(self.store.prev[case], lb, size, 0)
                for k in range(1, n_prev + 1):
                    np.equal(prev, k, out=images[i, n_img + k - 1], casting="unsafe")
        if self.dim == 2:  # drop the one-slice axis: (B, C, 1, H, W) -> (B, C, H, W)
            images, segs = images[:, :, 0], segs[:, :, 0]
        return images, segs


def initial_patch_size(patch: list[int], aug: dict) -> list[int]:
    """Sample a larger region when spatial augmentation is on so rotated/scaled patches have no
    empty corners; the augmentation centre-crops back to ``patch``."""
    rot = aug.get("rotation_p", 0) > 0
    scale = aug.get("scale_p", 0) > 0
    if not (rot or scale):
        return list(patch)
    deg = float(aug.get("rotation_deg", 30.0)) if rot else 0.0
    factor = abs(math.cos(math.radians(deg))) + abs(math.sin(math.radians(deg)))
    factor /= min(aug.get("scale_range", [0.85, 1.25])[0], 1.0) if scale else 1.0
    factor = min(factor, float(aug.get("max_patch_growth", 1.5)))
    return [int(math.ceil(p * factor)) for p in patch]


# ----------------------------------------------------------------------------- loss
def soft_dice(
    probs: torch.Tensor, onehot: torch.Tensor, batch_dice: bool, smooth: float = 1e-5
) -> torch.Tensor:
    """Soft Dice per foreground class (background excluded), nnU-Net's formula."""
    axes = [0, *range(2, probs.ndim)] if batch_dice else list(range(2, probs.ndim))
    tp = (probs * onehot).sum(axes)
    fp = (probs * (1 - onehot)).sum(axes)
    fn = ((1 - probs) * onehot).sum(axes)
    dc = (2 * tp + smooth) / torch.clamp(2 * tp + fp + fn + smooth, min=1e-8)
    return dc[..., 1:].mean()


def dc_ce_loss(logits: torch.Tensor, target: torch.Tensor, batch_dice: bool) -> torch.Tensor:
    """Cross-entropy + (1 - soft Dice), as nnU-Net's DC_and_CE_loss (which adds -Dice)."""
    ce = F.cross_entropy(logits, target[:, 0])
    probs = torch.softmax(logits.float(), 1)
    onehot = F.one_hot(target[:, 0], logits.shape[1]).movedim(-1, 1).to(probs.dtype)
    return ce - soft_dice(probs, onehot, batch_dice)


def deep_supervision_weights(n: int) -> list[float]:
    """1/2^i per output, lowest resolution weighted 0, normalised to sum 1."""
    w = np.array([1 / 2**i for i in range(n)])
    if n > 1:
        w[-1] = 0
    return (w / w.sum()).tolist()


def total_loss(outputs, target: torch.Tensor, weights: list[float], batch_dice: bool):
    outputs = outputs if isinstance(outputs, list | tuple) else [outputs]
    loss = 0.0
    for w, out in zip(weights, outputs, strict=False):
        if w == 0:
            continue
        t = target
        if tuple(out.shape[2:]) != tuple(target.shape[2:]):
            t = F.interpolate(target.float(), size=out.shape[2:], mode="nearest").long()
        loss = loss + w * dc_ce_loss(out, t, batch_dice)
    return loss


# ----------------------------------------------------------------------------- checkpoints
CHECKPOINT = "checkpoint_latest.pt"
PREVIOUS_CHECKPOINT = "checkpoint_previous.pt"
_CHECKPOINT_KEYS = ("model", "optimizer", "history", "torch_rng", "gen_rng", "numpy_rng")
# what does not change the result of an epoch: where it runs, how often it is saved, and the
# number of epochs (a finished run may be extended; the poly schedule follows the new total)
_NOT_FINGERPRINTED = ("device", "threads", "checkpoint_every", "epochs")


class TrainingInterrupted(KitsnetError):
    """Training stopped on SIGTERM after writing a checkpoint; rerunning the job resumes it."""


def _fault(point: str, **where: int) -> None:
    """Test hook (see the module docstring): kill this process at ``point`` when asked to."""
    spec = os.environ.get("KITSNET_FAULT")
    if not spec:
        return
    name, _, args = spec.partition(":")
    want = dict(kv.split("=", 1) for kv in args.split(",") if kv)
    sig = getattr(signal, "SIG" + want.pop("signal", "KILL"))
    if name == point and all(str(where.get(k)) == v for k, v in want.items()):
        os.kill(os.getpid(), sig)


def _save_torch(obj: dict, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _save_checkpoint_file(obj: dict, path: Path, previous: Path, epoch: int) -> None:
    """Write ``path`` whole (temporary + fsync + rename), keeping the one it replaces."""
    buf = _io.BytesIO()
    torch.save(obj, buf)
    data = buf.getbuffer()
    with atomic_path(path, durable=True) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data[: len(data) // 2])
            fh.flush()
            _fault("during_checkpoint_write", epoch=epoch)
            fh.write(data[len(data) // 2 :])
        if path.exists():
            os.replace(path, previous)


def load_checkpoint(path: Path) -> dict:
    """Load a checkpoint safely (weights_only); a truncated file raises KitsnetError."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise KitsnetError(f"{path}: unreadable checkpoint ({type(exc).__name__}: {exc})") from exc


def load_resumable_checkpoint(out_dir: Path, fingerprint: str, log=print) -> dict | None:
    """The newest checkpoint of ``out_dir`` that loads and was made with these settings.

    ``checkpoint_latest.pt`` first, then ``checkpoint_previous.pt``.  An unreadable checkpoint
    is reported and moved aside (so the next save cannot rotate it over the good one); checkpoints
    of other settings are deleted and ``None`` returned (training starts over).
    """
    paths = [out_dir / CHECKPOINT, out_dir / PREVIOUS_CHECKPOINT]
    for path in paths:
        remove_stale_temporaries(path)
    for path in paths:
        if not path.exists():
            continue
        try:
            ck = load_checkpoint(path)
            missing = [k for k in _CHECKPOINT_KEYS if k not in ck]
            if missing:
                raise KitsnetError(f"{path}: incomplete checkpoint (no {', '.join(missing)})")
        except KitsnetError as exc:
            aside = path.with_name(path.name + ".unreadable")
            log(f"{exc}; moved to {aside.name}, trying the previous checkpoint")
            os.replace(path, aside)
            continue
        if ck.get("fingerprint") != fingerprint:
            log(f"{path} was made with other settings or input data; starting over")
            for p in paths:
                p.unlink(missing_ok=True)
            return None
        if path.name == PREVIOUS_CHECKPOINT:
            os.replace(path, paths[0])  # the next save keeps it as the previous one
            ck["_path"] = str(paths[0])
        else:
            ck["_path"] = str(path)
        return ck
    return None


def settings_fingerprint(
    plan: dict,
    split: dict,
    fold: int,
    seed: int,
    training: dict,
    augmentation: dict,
    input_files: list[Path],
) -> str:
    """What a checkpoint must have been made with to be resumed: the settings and the inputs
    (name, size and modification time of every file training reads)."""
    files = []
    for f in sorted(input_files):
        st = f.stat()
        files.append([str(f), st.st_size, st.st_mtime_ns])
    blob = {
        "plan": plan,
        "split": split,
        "fold": fold,
        "seed": seed,
        "training": {k: v for k, v in training.items() if k not in _NOT_FINGERPRINTED},
        "augmentation": augmentation,
        "inputs": files,
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()


@contextlib.contextmanager
def _sigterm_flag():
    """While training, SIGTERM only sets a flag; the loop checkpoints and stops at the next
    iteration boundary.  Outside the main thread the default handling is left alone."""
    flag: dict[str, int | None] = {"signal": None}

    def handler(signum, frame):
        flag["signal"] = signum

    try:
        old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        old = None
    try:
        yield flag
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)


def _write_log(history: list[dict], path: Path) -> None:
    buf = _io.StringIO()
    writer = csv.DictWriter(buf, LOG_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in row.items()})
    with atomic_path(path) as tmp:
        tmp.write_text(buf.getvalue())


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# ----------------------------------------------------------------------------- training
def train_fold(
    plan: dict,
    splits: list[dict],
    fold: int,
    data_dir: str | Path,
    out_dir: str | Path,
    training: dict,
    augmentation: dict,
    prev_dirs: list[str | Path] | None = None,
    seed: int = 0,
    device: str = "auto",
    log=print,
) -> dict:
    """Train one configuration on one fold; writes model_final.pt, model_best.pt,
    checkpoint_latest.pt (+ checkpoint_previous.pt) and training_log.csv into ``out_dir``.

    Resumes from the checkpoints in ``out_dir`` when they exist (see the module docstring);
    raises :class:`TrainingInterrupted` after checkpointing when SIGTERM arrives."""
    out_dir, data_dir = Path(out_dir), Path(data_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dev = pick_device(device)
    split = splits[fold]
    prev = [Path(d) for d in prev_dirs] if prev_dirs else None
    train_store = CaseStore(split["train"], data_dir, prev)
    val_store = CaseStore(split["val"], data_dir, prev)

    torch.manual_seed(seed + fold)
    rng = np.random.default_rng([seed, fold])
    gen = torch.Generator().manual_seed(seed * 1000 + fold)
    arch = plan["arch"]
    net = build_network(arch, plan["in_channels"], plan["num_classes"]).to(dev)
    opt = torch.optim.SGD(
        net.parameters(),
        lr=training["initial_lr"],
        momentum=training["momentum"],
        nesterov=training["nesterov"],
        weight_decay=training["weight_decay"],
    )
    epochs = int(training["epochs"])
    n_prev = plan["num_classes"] - 1 if plan.get("previous_stage") else 0
    history: list[dict] = []
    ema, best = None, -math.inf
    best_state, best_epochs = None, 0
    # position inside an epoch when the last checkpoint was written on SIGTERM
    partial: dict = {}
    ckpt_path, previous_path = out_dir / CHECKPOINT, out_dir / PREVIOUS_CHECKPOINT
    inputs = [data_dir / f"{c}{x}" for c in split["train"] + split["val"] for x in _CASE_FILES]
    if prev:
        inputs += [find_previous_stage(c, prev) for c in split["train"] + split["val"]]
    fingerprint = settings_fingerprint(plan, split, fold, seed, training, augmentation, inputs)
    for name in ("model_final.pt", "model_best.pt", "training_log.csv"):
        remove_stale_temporaries(out_dir / name)  # left by a killed run
    ck = load_resumable_checkpoint(out_dir, fingerprint, log)
    if ck is not None:
        net.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        history = json.loads(ck["history"])
        ema, best = ck["ema"], ck["best"]
        best_state, best_epochs = ck.get("best_model"), int(ck.get("best_epochs", 0))
        partial = json.loads(ck.get("partial_epoch") or "{}")
        torch.set_rng_state(ck["torch_rng"])
        gen.set_state(ck["gen_rng"])
        rng.bit_generator.state = json.loads(ck["numpy_rng"])
        where = f", iteration {partial['iteration']}" if partial else ""
        log(f"resumed from {ck['_path']} after epoch {len(history)}{where}")
    del ck

    patch = list(plan["patch_size"])
    # max_patch_growth is the sampler's setting, cascade_* act on the previous-stage channels;
    # the rest are augment_batch's own
    aug = {
        k: v
        for k, v in augmentation.items()
        if k != "max_patch_growth" and not k.startswith("cascade_")
    }
    train_sampler = PatchSampler(
        train_store,
        initial_patch_size(patch, augmentation),
        arch["dim"],
        training["oversample_foreground"],
        rng,
    )
    val_sampler = PatchSampler(
        val_store, patch, arch["dim"], training["oversample_foreground"], rng
    )
    weights = deep_supervision_weights(
        len(arch["features_per_stage"]) - 1 if arch["deep_supervision"] else 1
    )
    batch, batch_dice = int(plan["batch_size"]), bool(training.get("batch_dice", True))
    use_amp = dev.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16

    def save_checkpoint(epoch: int, partial_epoch: dict | None = None) -> None:
        _save_checkpoint_file(
            {
                "model": net.state_dict(),
                "optimizer": opt.state_dict(),
                "history": json.dumps(history),
                "ema": ema,
                "best": best,
                "best_model": best_state,
                "best_epochs": best_epochs,
                "partial_epoch": json.dumps(partial_epoch) if partial_epoch else "",
                "torch_rng": torch.get_rng_state(),
                "gen_rng": gen.get_state(),
                "numpy_rng": json.dumps(rng.bit_generator.state),
                "fingerprint": fingerprint,
            },
            ckpt_path,
            previous_path,
            epoch,
        )

    def save_model(path: Path, state: dict, n_epochs: int) -> None:
        _save_torch(
            {"state_dict": state, "plan": json.dumps(plan), "fold": fold, "epochs": n_epochs},
            path,
        )

    n_iter = int(training["iterations_per_epoch"])
    with _sigterm_flag() as stop:
        for epoch in range(len(history), epochs):
            resume = partial if partial.get("epoch") == epoch else {}
            t0 = time.perf_counter() - float(resume.get("elapsed_s", 0.0))
            lr = training["initial_lr"] * (1 - epoch / epochs) ** training["poly_exponent"]
            for g in opt.param_groups:
                g["lr"] = lr
            net.train()
            losses = list(resume.get("losses", []))
            for it in range(int(resume.get("iteration", 0)), n_iter):
                img, seg = train_sampler.sample(batch, n_prev)
                # Sampled on the CPU, augmented where the network runs: on a GPU the batched
                # transforms take milliseconds, so training is bounded by the GPU, not by CPU
                # workers (nnU-Net's ~40% GPU utilisation with CPU augmentation).
                img_t, seg_t = augment_batch(
                    torch.from_numpy(img).to(dev),
                    torch.from_numpy(seg).to(dev),
                    patch,
                    aug,
                    gen,
                    n_intensity_channels=img.shape[1] - n_prev,
                )
                if n_prev:
                    img_t[:, -n_prev:] = _augment_previous_stage(
                        img_t[:, -n_prev:], augmentation, gen
                    )
                img_t, seg_t = img_t.to(dev), seg_t.long().to(dev)
                opt.zero_grad(set_to_none=True)
                with torch.autocast(dev.type, dtype=amp_dtype, enabled=use_amp):
                    out = net(img_t)
                loss = total_loss(out, seg_t, weights, batch_dice)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(net.parameters(), training["grad_clip"])
                opt.step()
                losses.append(float(loss.detach()))
                _fault("after_iteration", epoch=epoch, iteration=it)
                if stop["signal"] is not None and it + 1 < n_iter:
                    position = {
                        "epoch": epoch,
                        "iteration": it + 1,
                        "losses": losses,
                        "elapsed_s": time.perf_counter() - t0,
                    }
                    save_checkpoint(epoch, position)
                    raise TrainingInterrupted(
                        f"{out_dir}: stopped by signal {stop['signal']} in epoch {epoch} after "
                        f"iteration {it}; checkpoint written, rerun to resume"
                    )
            val_loss, dice = _validate(
                net,
                val_sampler,
                batch,
                n_prev,
                int(training["val_iterations"]),
                weights,
                batch_dice,
                dev,
                plan["num_classes"],
            )
            ema = (
                dice
                if ema is None
                else training["ema_alpha"] * ema + (1 - training["ema_alpha"]) * dice
            )
            history.append(
                {
                    "epoch": epoch,
                    "train_loss": float(np.mean(losses)),
                    "val_loss": val_loss,
                    "pseudo_dice": dice,
                    "ema_pseudo_dice": ema,
                    "lr": lr,
                    "epoch_time_s": time.perf_counter() - t0,
                }
            )
            log(
                f"epoch {epoch}: train {np.mean(losses):.4f} val {val_loss:.4f} "
                f"dice {dice:.4f} ema {ema:.4f} ({history[-1]['epoch_time_s']:.1f}s)"
            )
            if ema > best:
                best, best_epochs = ema, len(history)
                best_state = {
                    k: v.detach().to("cpu", copy=True) for k, v in net.state_dict().items()
                }
            _write_log(history, out_dir / "training_log.csv")
            if (
                (epoch + 1) % int(training["checkpoint_every"]) == 0
                or epoch + 1 == epochs
                or stop["signal"] is not None
            ):
                save_checkpoint(epoch)
            if stop["signal"] is not None and epoch + 1 < epochs:
                raise TrainingInterrupted(
                    f"{out_dir}: stopped by signal {stop['signal']} after epoch {epoch}; "
                    "checkpoint written, rerun to resume"
                )
            _fault("between_epochs", epoch=epoch)
    if best_state is None:  # no epoch improved on -inf: only if there were no epochs at all
        best_state, best_epochs = net.state_dict(), len(history)
    save_model(out_dir / "model_best.pt", best_state, best_epochs)
    save_model(out_dir / "model_final.pt", net.state_dict(), len(history))
    return {"epochs": len(history), "best_ema_pseudo_dice": best}


def _augment_previous_stage(onehot: torch.Tensor, aug: dict, gen: torch.Generator) -> torch.Tensor:
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


@torch.no_grad()
def _validate(net, sampler, batch, n_prev, iterations, weights, batch_dice, dev, n_classes):
    """Validation loss and nnU-Net's pseudo-Dice (per-class TP/FP/FN summed over patches)."""
    net.eval()
    tp = np.zeros(n_classes - 1)
    fp, fn, losses = tp.copy(), tp.copy(), []
    for _ in range(iterations):
        img, seg = sampler.sample(batch, n_prev)
        x, y = torch.from_numpy(img).to(dev), torch.from_numpy(seg).to(dev)
        out = net(x)
        losses.append(float(total_loss(out, y, weights, batch_dice)))
        pred = (out[0] if isinstance(out, list | tuple) else out).argmax(1)
        for k in range(1, n_classes):
            p, t = pred == k, y[:, 0] == k
            tp[k - 1] += float((p & t).sum())
            fp[k - 1] += float((p & ~t).sum())
            fn[k - 1] += float((~p & t).sum())
    denom = 2 * tp + fp + fn
    dice = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), np.nan)
    return float(np.mean(losses)), float(np.nanmean(dice)) if np.isfinite(dice).any() else 0.0
