"""``kitsnet predict``: new scans through the model that model selection chose, as nnU-Net's
``find_best_configuration`` instructions are followed after cross-validation.

By default the model is ``results/best_configuration.json`` (one configuration or the ensemble
of two, with or without its postprocessing); ``--model`` names another, whose postprocessing is
then the one decided for it (``results/postprocessing/<model>.json``) if the workflow decided
one.  Per case: each configuration's fold models predict (logits averaged over the folds, as
nnU-Net v2's predictor does), the probabilities of an ensemble's members are averaged in the
same compact form the workflow's ``ensemble`` jobs average, then arg-max and postprocessing.
So for the same models a case gets exactly the workflow's labels.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from kitsnet.core.io import KitsnetError, load_json, load_volume
from kitsnet.postprocess.apply import apply_steps
from kitsnet.postprocess.selection import read_best
from kitsnet.predict.averaging import ensemble
from kitsnet.predict.images import (
    DEFAULT_INFERENCE,
    ConfigurationModels,
    load_configuration,
    scan_inputs,
    scan_prediction,
)
from kitsnet.predict.infer import write_prediction
from kitsnet.predict.probabilities import save_probabilities
from kitsnet.preprocess.case import geometry_of
from kitsnet.stages import CONFIGURATIONS, FINAL_MODEL


@dataclass
class Choice:
    """What to run: the configurations (two: an ensemble), the postprocessing, and why."""

    model: str
    configurations: list[str]
    steps: list[str] = field(default_factory=list)
    min_volume_mm3: float | None = None
    reason: str = ""
    inference: dict = field(default_factory=dict)


def _named(results: Path, model: str, postprocessing: bool) -> Choice:
    """``--model NAME``: its postprocessing is the workflow's decision for it, if any."""
    configs = model.split("+")
    unknown = [c for c in configs if c not in CONFIGURATIONS]
    if unknown or len(configs) > 2:
        raise KitsnetError(
            f"--model {model}: not a configuration or a pair A+B of {', '.join(CONFIGURATIONS)}"
        )
    choice = Choice(model, configs, reason="named with --model")
    decision = results / "postprocessing" / f"{model}.json"
    if postprocessing and decision.is_file():
        found = load_json(decision)
        choice.steps = list(found.get("steps", []))
        choice.min_volume_mm3 = found.get("min_volume_mm3")
        choice.reason += f"; postprocessing as decided in {decision}"
    return choice


def choose(
    results: Path, model: str | None, best_file: Path | None, postprocessing: bool = True
) -> Choice:
    """The model to run: ``model`` if named, else the workflow's best configuration; either way
    with the workflow's sliding-window settings where it recorded them."""
    path = best_file or results / "best_configuration.json"
    if model is not None:
        choice = _named(results, model, postprocessing)
        if path.is_file():
            choice.inference = dict(read_best(path).get("inference") or {})
        return choice
    best = read_best(path)
    pp = best.get("postprocessing") or {}
    score = (best.get("scores") or {}).get("kits_score")
    reason = f"the best of model selection in {path}"
    reason += f", kits_score {score:.4f}" if isinstance(score, float) else ""
    steps = list(pp.get("steps") or []) if postprocessing else []
    return Choice(
        best["model"],
        list(best["configurations"]),
        steps,
        pp.get("min_volume_mm3"),
        reason,
        dict(best.get("inference") or {}),
    )


class TileProgress:
    """Progress of one case on stderr: tiles done, elapsed, estimated time left (every few
    seconds and when a configuration finishes)."""

    def __init__(self, case: str, what: str, every_s: float = 5.0, stream=None):
        self.case, self.what, self.every_s, self.stream = case, what, every_s, stream
        self.start = self.last = time.monotonic()

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - self.last < self.every_s:
            return
        self.last, elapsed = now, now - self.start
        left = elapsed * (total - done) / done if done else float("nan")
        print(
            f"{self.case} {self.what}: {done}/{total} tiles, {elapsed:.0f} s elapsed, "
            f"~{left:.0f} s left",
            file=self.stream or sys.stderr,
            flush=True,
        )


def predict_best(
    input_path: Path,
    out_dir: Path,
    results: Path = Path("results"),
    models_dir: Path | None = None,
    model: str | None = None,
    best_file: Path | None = None,
    folds: list[int] | None = None,
    inference: dict | None = None,
    save_probs: bool = False,
    postprocessing: bool = True,
    checkpoint: str = FINAL_MODEL,
    device: str = "auto",
    log=print,
) -> list[Path]:
    """Segment the scans at ``input_path`` with the chosen model; ``out_dir/<case>.nii.gz``
    on each scan's grid, and with ``save_probs`` its class (or region) probabilities
    ``<case>.npz``.
    ``inference`` overrides the sliding-window settings the workflow recorded in
    ``best_configuration.json`` (else :data:`DEFAULT_INFERENCE`, mirroring on)."""
    from kitsnet.core.device import pick_device

    choice = choose(Path(results), model, best_file, postprocessing)
    dev = pick_device(device)
    # the workflow's settings (same labels), then what the caller overrides
    inf = {**DEFAULT_INFERENCE, "mirror": True, **choice.inference, **(inference or {})}
    models_dir = Path(models_dir) if models_dir else Path(results) / "models"
    members = [
        load_configuration(models_dir, c, folds, checkpoint, dev) for c in choice.configurations
    ]
    log(_describe(choice, members))
    written = []
    for name, path in scan_inputs(Path(input_path)):
        vol = load_volume(path, name)
        preds = [
            scan_prediction(m, vol, name, inf, dev, TileProgress(name, m.name)) for m in members
        ]
        # an ensemble: the members' probabilities averaged (regions if either is region-based)
        seg, probs = preds[0] if len(preds) == 1 else ensemble([p for _, p in preds])
        geometry = geometry_of(vol, name)
        if choice.steps:
            seg = apply_steps(
                seg, geometry["original_spacing"], choice.steps, choice.min_volume_mm3
            )
        out = Path(out_dir) / f"{name}.nii.gz"
        write_prediction(seg, geometry, out)
        if save_probs:
            save_probabilities(Path(out_dir) / f"{name}.npz", probs)
        written.append(out)
        log(f"{name}: wrote {out}")
    return written


def _describe(choice: Choice, members: list[ConfigurationModels]) -> str:
    """The line that tells the user which model runs, from which folds, and why."""
    folds = ", ".join(f"{m.name} {'/'.join(m.folds)}" for m in members)
    steps = ", ".join(choice.steps) if choice.steps else "none"
    return (
        f"kitsnet predict: model {choice.model} ({choice.reason}); folds: {folds}; "
        f"postprocessing: {steps}"
    )
