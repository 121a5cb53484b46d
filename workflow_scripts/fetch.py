"""Adapter: rule fetch_imaging -> kitsnet.data.fetch.fetch (one case) + a copy of its label file."""

import shutil
from pathlib import Path

from kitsnet.core.io import KitsnetError, atomic_path, log_to
from kitsnet.data.fetch import DEFAULT_BASE_URL, fetch

with log_to(snakemake.log[0]):
    case = snakemake.wildcards.case
    out = Path(snakemake.output.image).parent.parent
    summary = fetch(
        snakemake.params.dataset,
        out,
        cases=[case],
        base_url=snakemake.params.base_url or DEFAULT_BASE_URL,
        jobs=1,
        progress=False,
    )
    print(summary.report())
    if summary.failed:
        raise KitsnetError(f"{case}: imaging not fetched: {summary.failed[case]}")
    with atomic_path(Path(snakemake.output.label)) as tmp:
        shutil.copyfile(snakemake.input.label, tmp)
