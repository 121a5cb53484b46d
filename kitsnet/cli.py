"""The ``kitsnet`` command: each pipeline stage usable without Snakemake.

kitsnet synth --out DIR --cases N --seed S
kitsnet validate DATA_ROOT
kitsnet evaluate --pred-dir P --ref-dir R --out scores.csv [--jobs N]
kitsnet predict --models DIR --input IMAGE_OR_DIR --out DIR [--config 3d_fullres]
kitsnet fetch {kits21,kits23} --out DIR [--cases SPEC] [--jobs N] [--retries N] [--timeout S]
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

    verdict = validate_dataset(args.data_root, folds=args.folds, dataset=args.dataset)
    print(
        f"{args.data_root}: {verdict['n_cases']} cases ({verdict['dataset']} layout), "
        "no problems found"
    )
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


def _fetch(args: argparse.Namespace) -> int:
    from .fetch import fetch

    summary = fetch(
        args.dataset,
        args.out,
        cases=args.cases,
        base_url=args.base_url,
        jobs=args.jobs,
        retries=args.retries,
        timeout=args.timeout,
    )
    print(summary.report())
    if summary.failed:
        failed = sorted(summary.failed.items())
        named = "; ".join(f"{case}: {why}" for case, why in failed[:10])
        more = f"; and {len(failed) - 10} more (see above)" if len(failed) > 10 else ""
        raise KitsnetError(
            f"{len(failed)} case(s) failed (a rerun fetches only those): {named}{more}"
        )
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

    p = sub.add_parser(
        "validate", help="check a KiTS21- or KiTS23-layout folder, report all problems"
    )
    p.add_argument("data_root", type=Path)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument(
        "--dataset",
        choices=["auto", "kits21", "kits23"],
        default="auto",
        help="layout: KiTS21 (aggregated_MAJ_seg.nii.gz) or KiTS23 (segmentation.nii.gz); "
        "auto: from the files found",
    )
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

    from .fetch import DEFAULT_BASE_URL

    p = sub.add_parser(
        "fetch",
        help="download the KiTS CT scans (imaging.nii.gz) from Hugging Face",
        description=(
            "Download each case's CT to OUT/case_XXXXX/imaging.nii.gz, normally the data folder "
            "of a kits21 (data/) or kits23 (dataset/) clone, which holds the label maps. "
            "Transfers resume after a cut, are retried, and are checked (size, gzip, NIfTI "
            "header) before they appear; a rerun fetches only missing or broken cases. "
            "Proxies: set HTTPS_PROXY / https_proxy (and NO_PROXY) as for any urllib program."
        ),
    )
    p.add_argument("dataset", choices=["kits21", "kits23"])
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="folder for case_XXXXX/")
    p.add_argument(
        "--cases", metavar="SPEC", help="case numbers, e.g. 0-9,42 (default: all of the dataset)"
    )
    p.add_argument(
        "--base-url",
        default=DEFAULT_BASE_URL,
        metavar="URL",
        help="dataset root; files are URL/images/case_XXXXX.nii.gz (default: %(default)s)",
    )
    p.add_argument(
        "--jobs", type=int, default=4, metavar="N", help="parallel downloads (default: 4)"
    )
    p.add_argument(
        "--retries", type=int, default=5, metavar="N", help="retries per case (default: 5)"
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        metavar="S",
        help="seconds without data before a retry (default: 60)",
    )
    p.set_defaults(func=_fetch)

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
