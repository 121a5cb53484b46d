"""Shared fixtures: the repository root, the shared KiTS21 label maps, tiny KiTS-layout data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_LABELS = REPO.parent / "shared" / "kits21_labels"


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def shared_labels() -> Path:
    if not SHARED_LABELS.is_dir():
        pytest.skip(f"{SHARED_LABELS} is absent: the real KiTS21 label maps live in ../shared")
    return SHARED_LABELS


@pytest.fixture(scope="session")
def tiny_kits(tmp_path_factory) -> Path:
    """Ten synthetic cases in KiTS21's layout (session-wide, read-only for tests)."""
    from kitsnet.synth import make_dataset

    root = tmp_path_factory.mktemp("kits") / "data"
    make_dataset(root, 10, seed=7)
    return root


def cube_label(shape=(20, 24, 24), box=(slice(5, 15), slice(6, 18), slice(6, 18))) -> np.ndarray:
    lab = np.zeros(shape, np.uint8)
    lab[box] = 1
    return lab
