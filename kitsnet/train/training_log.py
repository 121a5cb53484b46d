"""The training log: ``training_log.csv``, one row per finished epoch, written by the training
loop (:mod:`kitsnet.train.loop`) and read by the report's curves and progress plot
(:mod:`kitsnet.report.figures`).

This module imports neither torch nor the network, so the report's environment (no torch) can
import the columns from the writer instead of keeping its own copy of them.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from kitsnet.core.io import atomic_path

__all__ = ["EPOCH_TIME_COLUMN", "LOG_COLUMNS", "TRAINING_LOG", "write_training_log"]

#: The log's file name inside a fold's model folder.
TRAINING_LOG = "training_log.csv"
#: The epoch's wall-clock time: the only column that differs between two runs of the same
#: settings, so comparisons of reruns and plots that do not show time leave it out.
EPOCH_TIME_COLUMN = "epoch_time_s"
#: The log's columns, in file order.
LOG_COLUMNS = [
    "epoch",
    "train_loss",
    "val_loss",
    "pseudo_dice",
    "ema_pseudo_dice",
    "lr",
    EPOCH_TIME_COLUMN,
]


def write_training_log(history: list[dict], path: Path) -> None:
    """Write the whole history (rewritten after every epoch, atomically, so a killed job never
    leaves a half-written log); floats to 6 decimals so reruns compare as text."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, LOG_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in row.items()})
    with atomic_path(path) as tmp:
        tmp.write_text(buf.getvalue())
