"""The model-selection section of ``table1.md``: every configuration and two-configuration
ensemble with and without postprocessing (``results/model_selection.csv``), best first.

Read from the CSV the selection job wrote (data flows one way: the report does not recompute
or re-rank anything; the best is the arg-max of ``kits_score``, as the selection chose it).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from kitsnet.core.io import KitsnetError
from kitsnet.evaluate.metrics import METRIC_COLUMNS

_COLUMNS = ["model", "postprocessed", *METRIC_COLUMNS, "kits_score"]


def selection_markdown(csv: Path) -> str:
    """Markdown of the selection table, sorted by ``kits_score`` (best first, ties in the
    file's order), the best row in bold."""
    table = pd.read_csv(csv)
    missing = set(_COLUMNS) - set(table.columns)
    if missing:
        raise KitsnetError(f"{csv}: not a model_selection.csv (missing {sorted(missing)})")
    table = table.sort_values("kits_score", ascending=False, kind="stable")
    head = "| " + " | ".join(_COLUMNS) + " |"
    lines = [
        "",
        "## Model selection: configurations and ensembles, with and without postprocessing",
        "",
        "Out-of-fold cases; an ensemble A+B averages the probabilities of A and B; "
        "postprocessing is decided per model on the same cases (`results/postprocessing/`); "
        "`kits_score` is the mean of the six columns.  The first row is "
        "`results/best_configuration.json`, what `kitsnet predict` runs by default.",
        "",
        head,
        "|---|:---:|" + "---:|" * (len(_COLUMNS) - 2),
    ]
    for i, row in enumerate(table.itertuples(index=False)):
        cells = [str(row.model), str(row.postprocessed).lower()]
        cells += [f"{float(getattr(row, c)):.4f}" for c in _COLUMNS[2:]]
        if i == 0:
            cells = [f"**{c}**" for c in cells]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join([*lines, ""])
