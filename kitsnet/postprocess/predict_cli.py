"""``kitsnet predict``'s options: new scans through the best model (or a named one).

Kept apart from :mod:`kitsnet.postprocess.predict_best` so that ``kitsnet --help`` needs no
torch."""

from __future__ import annotations

import argparse
from pathlib import Path

from kitsnet.stages import CONFIGURATIONS, FINAL_MODEL

DEFAULT_STEP_SIZE = 0.5


def _overrides(args: argparse.Namespace) -> dict:
    """The sliding-window settings given on the command line (the rest: the workflow's)."""
    out: dict = {}
    if args.step_size is not None:
        out["step_size"] = args.step_size
    if args.no_mirror:
        out["mirror"] = False
    return out


def _run(args: argparse.Namespace) -> int:
    from kitsnet.postprocess.predict_best import predict_best

    written = predict_best(
        Path(args.input),
        Path(args.out),
        results=Path(args.results),
        models_dir=Path(args.models) if args.models else None,
        model=args.model,
        best_file=Path(args.best) if args.best else None,
        folds=args.folds,
        inference=_overrides(args),
        save_probs=args.save_probabilities,
        postprocessing=not args.no_postprocessing,
        checkpoint=args.checkpoint,
        device=args.device,
    )
    print(f"wrote {len(written)} predictions to {args.out}")
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:
    """Register ``kitsnet predict``."""
    p = sub.add_parser(
        "predict",
        help="segment new CT scans with the best model of model selection (or --model)",
        description="Run from a workflow folder, it follows results/best_configuration.json "
        "(a configuration or an ensemble of two, and its postprocessing) and says which model "
        "it uses; --model NAME runs another.",
    )
    p.add_argument(
        "--input", required=True, metavar="PATH", help="a .nii.gz CT or a folder of them"
    )
    p.add_argument(
        "--out", required=True, metavar="DIR", help="folder for <case>.nii.gz label maps"
    )
    p.add_argument(
        "--results",
        default="results",
        metavar="DIR",
        help="the workflow's results folder (default: %(default)s)",
    )
    p.add_argument(
        "--models", metavar="DIR", help="trained models (<config>/fold_k; default: RESULTS/models)"
    )
    p.add_argument(
        "--model",
        "--config",
        dest="model",
        metavar="NAME",
        help=f"a configuration ({', '.join(CONFIGURATIONS)}) or an ensemble A+B instead of the "
        "best; a cascade runs its first stage too (default: RESULTS/best_configuration.json)",
    )
    p.add_argument("--best", metavar="FILE", help="default: RESULTS/best_configuration.json")
    p.add_argument(
        "--folds",
        type=int,
        nargs="+",
        metavar="K",
        help="fold models to average (default: all found)",
    )
    p.add_argument(
        "--step-size",
        type=float,
        help="sliding-window step as a fraction of the patch (default: the workflow's, "
        f"from best_configuration.json, else {DEFAULT_STEP_SIZE})",
    )
    p.add_argument(
        "--save-probabilities",
        action="store_true",
        help="also write <case>.npz: the class probabilities (compact, uint8 / 255)",
    )
    p.add_argument(
        "--no-postprocessing", action="store_true", help="skip the model's postprocessing"
    )
    p.add_argument(
        "--checkpoint",
        default=FINAL_MODEL,
        metavar="FILE",
        help="checkpoint file name in each fold_k folder (default: %(default)s)",
    )
    p.add_argument(
        "--no-mirror",
        action="store_true",
        help="disable mirroring TTA (faster; default: the workflow's setting, else on)",
    )
    p.add_argument(
        "--device",
        default="auto",
        help="cpu, cuda or cuda:N; auto: a GPU if torch sees one, else the CPU "
        "(default: %(default)s)",
    )
    p.set_defaults(func=_run)
