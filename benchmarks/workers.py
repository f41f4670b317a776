"""How many Ray worker processes a search starts, what each one is, and Ray's pool warnings.

Runs ``python -m cbdtune.search`` (its flags after ``--``) as a child process and, every
``--every`` seconds, lists that child's descendant processes from ``/proc``: each Python worker
process the raylet starts (``default_worker.py``, retitled ``ray::<what it runs>`` once it runs
something) is recorded with its first and last title and its lifetime. Counts the lines of Ray's
worker-pool warning ("N PYTHON worker processes have been started on node ...") in the search's
output.

    python benchmarks/workers.py -- --dataset gesture --space smoke --num-samples 4 \
        --refit-top 0 --results-dir tmp/results --storage tmp/storage \
        --mlflow-uri sqlite:///tmp/mlflow.db

Writes results/workers_run.md (``--out``) with the command, machine, versions and date at the
top; results/workers.md compares runs before and after trials stopped using a TorchTrainer.
Linux only (``/proc``).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from _machine import provenance  # benchmarks/ is on sys.path when a script runs

ROOT = Path(__file__).resolve().parents[1]
WARNING = re.compile(r"(\d+) PYTHON worker processes have been started.*?(\d+)x the maximum")


@dataclass
class Proc:
    """One worker process seen: its titles in order and when it was first and last seen."""

    pid: int
    first: float
    last: float
    titles: list[str] = field(default_factory=list)


def _cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = collections.defaultdict(list)
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids[ppid].append(int(entry.name))
    return kids


def _descendants(root: int) -> list[int]:
    kids, out, todo = _children(), [], [root]
    while todo:
        pid = todo.pop()
        out.extend(kids.get(pid, []))
        todo.extend(kids.get(pid, []))
    return out


def _title(cmd: str) -> str | None:
    """A worker process's title: ``ray::X``, or ``starting`` before it has one (or, for
    Ray's I/O workers, never); None: not a pool worker (raylet, GCS, dashboard, agents)."""
    if cmd.startswith("ray::"):
        title = cmd.split()[0].split(".")[0]  # ray::Class.method -> ray::Class
        return None if title.endswith("Agent") else title  # the node's agents: not pool workers
    if "default_worker.py" in cmd:
        return "starting"
    return None


def watch(argv: list[str], every: float, log: Path) -> tuple[dict[int, Proc], float, int, int]:
    """Run the search, sampling its worker processes; returns them, the wall time, the
    largest number alive at once and the search's exit code."""
    seen: dict[int, Proc] = {}
    peak = 0
    start = time.monotonic()
    with log.open("w") as out:
        child = subprocess.Popen([sys.executable, "-m", "cbdtune.search", *argv], cwd=ROOT,
                                 stdout=out, stderr=subprocess.STDOUT)
        while child.poll() is None:
            now = time.monotonic() - start
            alive = 0
            for pid in _descendants(child.pid):
                title = _title(_cmdline(pid))
                if title is None:
                    continue
                alive += 1
                proc = seen.setdefault(pid, Proc(pid, now, now))
                proc.last = now
                if not proc.titles or proc.titles[-1] != title:
                    proc.titles.append(title)
            peak = max(peak, alive)
            time.sleep(every)
    return seen, time.monotonic() - start, peak, child.returncode


def kind(proc: Proc) -> str:
    """What a process was used for: its last title other than ``starting``/``ray::IDLE``."""
    used = [t for t in proc.titles if t not in ("starting", "ray::IDLE")]
    return used[-1] if used else (proc.titles[-1] if proc.titles else "?")


def report(argv: list[str], seen: dict[int, Proc], wall: float, peak: int, text: str) -> str:
    warnings = WARNING.findall(text)
    kinds = collections.Counter(kind(p) for p in seen.values())
    trials = len(re.findall(r"^\s*trial \S+ .*(completed|stopped|finished|error)", text, re.M))
    lines = [
        "# Ray worker processes started by a search",
        "",
        *provenance(__file__, ["--", *argv], packages=("ray",)),
        f"- wall time {wall:.0f} s; Python worker processes started: **{len(seen)}**, "
        f"at most **{peak}** alive at once (sampled)",
        f"- Ray's worker-pool warnings in the output: **{len(warnings)}**"
        + (f" (largest: {max(int(n) for n, _ in warnings)} processes)" if warnings else ""),
        f"- trial lines in the output: {trials}",
        "",
        "| what the process ran (last title) | processes |",
        "|---|---:|",
        *(f"| `{k}` | {n} |" for k, n in kinds.most_common()),
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--every", type=float, default=0.2, help="sampling period, seconds")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "workers_run.md")
    parser.add_argument("search", nargs=argparse.REMAINDER, help="-- then the search's flags")
    args = parser.parse_args()
    argv = [a for a in args.search if a != "--"] or ["--dataset", "gesture", "--space", "smoke",
                                                     "--num-samples", "4", "--refit-top", "0"]
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("CBDTUNE_DATA_DIR", str(ROOT.parent / "shared" / "data"))
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "search.log"
        seen, wall, peak, code = watch(argv, args.every, log)
        text = log.read_text()
    sys.stdout.write(text)
    if code != 0:
        sys.exit(f"error: the search exited with {code}; nothing written to {args.out}")
    md = report(argv, seen, wall, peak, text)
    print(md)
    for proc in sorted(seen.values(), key=lambda p: p.first):
        print(f"{proc.pid:>7} {proc.first:7.1f}-{proc.last:7.1f}s {' > '.join(proc.titles)}")
    args.out.write_text(md)


if __name__ == "__main__":
    main()
