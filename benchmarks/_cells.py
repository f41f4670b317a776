"""A benchmark's cells: one (dataset, seed) each, run once, shared between processes, kept as JSON.

The tables in results/ that take hours are built from cells. A cell's result lands in
``<runs>/<dataset>_seed<seed>.json`` with the settings it ran under. A process takes a cell by
claiming it (a ``.claim`` file beside it holding its PID), so that processes started side by side
share the work, a rerun skips what is finished (a stopped run resumes), and the claim of a
process that was killed is taken over. Every process ends by writing its table from the cells
finished with its settings, so the last one to finish writes the whole table.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

Cell = tuple[str, int]  # (dataset, seed)
RESULTS = Path(__file__).resolve().parents[1] / "results"


def folders(out_dir: str | Path | None, quick: bool, name: str) -> tuple[Path, Path]:
    """Where a benchmark writes its table (``out_dir``; default results/, a temporary folder with
    ``--quick``) and its cells (``<that>/<name>_runs``, created)."""
    out = Path(out_dir or (tempfile.mkdtemp(prefix="cbdtune-quick-") if quick else RESULTS))
    runs = out / f"{name}_runs"
    runs.mkdir(parents=True, exist_ok=True)
    return out, runs


def cell_path(runs: Path, dataset: str, seed: int) -> Path:
    return runs / f"{dataset}_seed{seed}.json"


def _claim(path: Path) -> bool:
    """Take a cell by creating ``path`` holding our PID; False if a live process holds it. A
    claim left by a process that is gone (killed) is taken over."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        text = path.read_text().strip()
        try:
            os.kill(int(text), 0)
            return False  # its process is alive
        except ValueError:
            return False  # just created by another process, PID not yet written
        except ProcessLookupError:
            path.unlink(missing_ok=True)
            return _claim(path)
    with os.fdopen(fd, "w") as f:
        f.write(str(os.getpid()))
    return True


@contextlib.contextmanager
def claimed(done: Path) -> Iterator[bool]:
    """A cell whose result lands in ``done``: yields True when this process took it (not
    finished, and no live process holds its claim), and frees the claim after."""
    claim = done.with_suffix(".claim")
    if done.exists() or not _claim(claim):
        yield False  # finished earlier, or another process runs it now
        return
    try:
        yield True
    finally:
        claim.unlink(missing_ok=True)


def write_done(done: Path, payload: dict[str, Any]) -> None:
    """``payload`` as JSON at ``done``, atomically: a reader sees all of it or no file."""
    tmp = done.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload))
    tmp.replace(done)


def run_cells(cells: list[Cell], runs: Path, run_one: Callable[[str, int], dict[str, Any]],
              settings: dict[str, Any]) -> None:
    """Run every cell not finished and not claimed by a live process: ``run_one(dataset, seed)``
    gives its result, saved with ``settings``; a progress line after each."""
    for i, (dataset, seed) in enumerate(cells, 1):
        done = cell_path(runs, dataset, seed)
        with claimed(done) as mine:
            if not mine:
                continue
            t0 = time.perf_counter()
            write_done(done, {"settings": settings, **run_one(dataset, seed)})
            print(f"[{i}/{len(cells)}] {dataset} seed {seed} done in "
                  f"{time.perf_counter() - t0:.0f} s -> {done}", flush=True)


def finished(cells: list[Cell], runs: Path, settings: dict[str, Any]
             ) -> dict[Cell, dict[str, Any]]:
    """The saved results of the cells finished with these settings, in dataset then seed order
    (datasets as they first appear in ``cells``); the others are named on stderr."""
    datasets = list(dict.fromkeys(d for d, _ in cells))
    out, missing = {}, []
    for dataset, seed in sorted(cells, key=lambda c: (datasets.index(c[0]), c[1])):
        path = cell_path(runs, dataset, seed)
        run = json.loads(path.read_text()) if path.exists() else None
        if run is None or run["settings"] != settings:
            missing.append(f"{dataset} seed {seed}")
        else:
            out[(dataset, seed)] = run
    if missing:
        print(f"not in the table (running elsewhere, not run, or run with other settings): "
              f"{', '.join(missing)}", file=sys.stderr)
    return out


def nothing_to_table(runs: Path) -> int:
    """Say why there is no table; exit status 0 while another process still runs cells."""
    busy = any(runs.glob("*.claim"))
    print("no finished runs to tabulate" + ("; another process is still running tasks"
                                            if busy else ""), file=sys.stderr)
    return 0 if busy else 1


# ---- summaries over seeds ----------------------------------------------------------------------


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; NaN for a single value), in %."""
    import numpy as np

    v = 100 * np.asarray(values, dtype=float)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else math.nan


def fmt_ms(mean: float, std: float) -> str:
    return f"{mean:.2f}" + (f" ± {std:.2f}" if std == std else "")
