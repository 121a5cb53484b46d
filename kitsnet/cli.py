"""The ``kitsnet`` command: each pipeline stage usable without Snakemake.

kitsnet synth --out DIR [--cases 20] [--seed 0]
kitsnet validate DATA_ROOT [--folds 5] [--dataset auto|kits21|kits23]
kitsnet predict --input IMAGE_OR_DIR --out DIR [--results results] [--model NAME]
                [--folds K ...] [--step-size S] [--save-probabilities]
                [--no-postprocessing] [--checkpoint model_final.pt] [--no-mirror]
                [--device auto]
kitsnet fetch kits21|kits23 --out DIR [--cases SPEC] [--base-url URL] [--jobs 4]
              [--retries 5] [--timeout 60]
kitsnet evaluate --pred-dir P --ref-dir R --out scores.csv [--jobs N]
kitsnet --version

`kitsnet COMMAND --help` describes a command's options and their defaults.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kitsnet.core.io import KitsnetError


def _synth(args: argparse.Namespace) -> int:
    from kitsnet.data.synth import make_dataset

    ids = make_dataset(args.out, args.cases, args.seed)
    print(f"wrote {len(ids)} cases to {args.out}")
    return 0


def _validate(args: argparse.Namespace) -> int:
    from kitsnet.data.dataset import validate_dataset

    verdict = validate_dataset(args.data_root, folds=args.folds, dataset=args.dataset)
    print(
        f"{args.data_root}: {verdict['n_cases']} cases ({verdict['dataset']} layout), "
        "no problems found"
    )
    return 0


def _fetch(args: argparse.Namespace) -> int:
    from kitsnet.data.fetch import fetch

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


def _add_synth(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("synth", help="write a synthetic KiTS-like dataset in KiTS21's layout")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="folder for case_XXXXX/")
    p.add_argument(
        "--cases", type=int, default=20, metavar="N", help="number of cases (default: %(default)s)"
    )
    p.add_argument(
        "--seed", type=int, default=0, help="same seed, same data (default: %(default)s)"
    )
    p.set_defaults(func=_synth)


def _add_validate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "validate", help="check a KiTS21- or KiTS23-layout folder, report all problems"
    )
    p.add_argument("data_root", type=Path, help="the folder holding case_XXXXX/")
    p.add_argument(
        "--folds",
        type=int,
        default=5,
        metavar="K",
        help="cross-validation folds: fewer cases than this is a problem (default: %(default)s)",
    )
    p.add_argument(
        "--dataset",
        choices=["auto", "kits21", "kits23"],
        default="auto",
        help="layout: KiTS21 (aggregated_MAJ_seg.nii.gz) or KiTS23 (segmentation.nii.gz); "
        "auto: from the files found (default: %(default)s)",
    )
    p.set_defaults(func=_validate)


def _add_fetch(sub: argparse._SubParsersAction) -> None:
    from kitsnet.data.fetch import DEFAULT_BASE_URL

    p = sub.add_parser(
        "fetch",
        help="download the KiTS CT scans (imaging.nii.gz) from Hugging Face",
        description=(
            "Download each case's CT to OUT/case_XXXXX/imaging.nii.gz, normally the data folder "
            "of a kits21 (data/) or kits23 (dataset/) clone, which holds the label maps. "
            "Transfers resume after a cut, are retried (each retry announced), and are checked "
            "(size, gzip, NIfTI header) before they appear; a rerun fetches only missing or "
            "broken cases. A host that cannot be connected to stops the run at once. "
            "Proxies: set HTTPS_PROXY / https_proxy (and NO_PROXY) as for any urllib program."
        ),
    )
    p.add_argument("dataset", choices=["kits21", "kits23"], help="which dataset's case numbers")
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
        "--jobs", type=int, default=4, metavar="N", help="parallel downloads (default: %(default)s)"
    )
    p.add_argument(
        "--retries",
        type=int,
        default=5,
        metavar="N",
        help="retries per case after a time-out, 5xx, 429 or cut (default: %(default)s)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        metavar="S",
        help="seconds without data before a retry (default: %(default)s)",
    )
    p.set_defaults(func=_fetch)


def build_parser() -> argparse.ArgumentParser:
    """The parser of every sub-command (one ``_add_*`` function each, evaluate's in its module)."""
    from kitsnet import __version__
    from kitsnet.evaluate.folders import add_cli
    from kitsnet.postprocess.predict_cli import add_cli as add_predict

    parser = argparse.ArgumentParser(
        prog="kitsnet", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {__version__}", help="print the version"
    )
    sub = parser.add_subparsers(dest="command", title="commands", metavar="COMMAND")
    for add in (_add_synth, _add_validate, add_predict, _add_fetch, add_cli):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; 1 on a :class:`KitsnetError` (its message on stderr), 2 without one."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:  # bare `kitsnet`: say what there is, as argparse does on errors
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except KitsnetError as exc:
        print(f"kitsnet {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
