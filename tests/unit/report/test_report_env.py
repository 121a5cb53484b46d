"""The report runs in its own environment (envs/report.yaml) without torch and without
surface-distance, so every report module must import without them.  The report takes constants
from the training loop's log writer and from the evaluation; this catches, in seconds, an import
that would pull torch or surface-distance in and stop the report's jobs (the end-to-end check
with the real environments is tests/workflow/test_envs.py, minutes)."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO

# what envs/report.yaml does not provide
ABSENT = ("torch", "surface_distance")
REPORT_MODULES = (
    "kitsnet.report.table1",
    "kitsnet.report.stats",
    "kitsnet.report.figures",
    "kitsnet.report.compute_cost",
)
PROBE = f"""
import importlib, sys

class Absent:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {ABSENT!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (not in envs/report.yaml)")

sys.meta_path.insert(0, Absent())
for module in {REPORT_MODULES!r}:
    importlib.import_module(module)
"""


def test_report_modules_import_without_torch_and_surface_distance():
    proc = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
