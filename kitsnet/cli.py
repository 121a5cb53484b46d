"""The ``kitsnet`` command: each pipeline stage usable without Snakemake.

kitsnet synth --out DIR --cases N --seed S
kitsnet validate DATA_ROOT
kitsnet evaluate --pred-dir P --ref-dir R --out scores.csv [--jobs N]
kitsnet predict --models DIR --input IMAGE_OR_DIR --out DIR [--config 3d_fullres]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .io import KitsnetError


def _synth(args: argparse.Namespace) -> int:
    from .synth import make_dataset

    ids = make_dataset(args.out, args.cases, args.seed)
    print(f"wrote {len(ids)} cases to {args.out}")
    return 0


def _validate(args: argparse.Namespace) -> int:
    from .dataset import validate_dataset

    verdict = validate_dataset(args.data_root, folds=args.folds)
    print(f"{args.data_root}: {verdict['n_cases']} cases, no problems found")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from .infer import predict_images

    written = predict_images(
        Path(args.models),
        Path(args.input),
        Path(args.out),
        args.config,
        checkpoint=args.checkpoint,
        mirror=not args.no_mirror,
        device=args.device,
    )
    print(f"wrote {len(written)} predictions to {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kitsnet", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write a synthetic KiTS-like dataset in KiTS21's layout")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--cases", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_synth)

    p = sub.add_parser("validate", help="check a KiTS21-layout folder, report all problems")
    p.add_argument("data_root", type=Path)
    p.add_argument("--folds", type=int, default=5)
    p.set_defaults(func=_validate)

    p = sub.add_parser("predict", help="segment new CT scans with a trained configuration")
    p.add_argument(
        "--models",
        required=True,
        help="the workflow's results/models folder (holding <config>/fold_k)",
    )
    p.add_argument("--input", required=True, help="a .nii.gz CT or a folder of them")
    p.add_argument("--out", required=True)
    p.add_argument("--config", default="3d_cascade_fullres")
    p.add_argument("--checkpoint", default="model_final.pt")
    p.add_argument("--no-mirror", action="store_true", help="disable mirroring TTA")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=_predict)

    from .evaluate import add_cli

    add_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KitsnetError as exc:
        print(f"kitsnet {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
