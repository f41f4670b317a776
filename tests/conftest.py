"""Shared test set-up: where the real datasets live, and no telemetry from Ray or MLflow."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    """The real datasets: ``$CBDTUNE_DATA_DIR`` if set, else ``<repo>/../shared/data``."""
    env = os.environ.get("CBDTUNE_DATA_DIR")
    return Path(env) if env else REPO.parent / "shared" / "data"


# At import time, before any test module imports Ray or MLflow: loaders that are given no data dir
# read the shared data, and neither library phones home from a test run.
os.environ.setdefault("CBDTUNE_DATA_DIR", str(shared_data_dir()))
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"


@pytest.fixture(autouse=True, scope="session")
def _ctrl_c_is_live() -> Iterator[None]:
    """Ctrl-C raises ``KeyboardInterrupt`` in the tests and in the processes they start, as in a
    terminal. A shell that starts pytest in the background (``nohup ... &``, ``cmd &`` in a
    script) starts it with SIGINT ignored, the processes it starts inherit that, and the Ctrl-C
    tests failed for it (the search rightly left an ignored SIGINT ignored)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture(name="shared_data_dir", scope="session")
def _shared_data_dir_fixture() -> Path:
    """:func:`shared_data_dir` as a fixture."""
    return shared_data_dir()


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One intra-op torch thread for a module, restored after it: on 2 busy cores the tests'
    tiny models ran several times slower with two. A module asks for it with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
