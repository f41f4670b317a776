"""The provenance lines every benchmark writes at the top of its results file."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import shlex
from collections.abc import Sequence
from pathlib import Path


def machine() -> str:
    """CPU model and core count, from /proc/cpuinfo where there is one."""
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores"


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, e.g. ``"1.92, 1.99, 2.04"`` (the machine is shared)."""
    return ", ".join(f"{v:.2f}" for v in os.getloadavg())


def provenance(script: str, argv: Sequence[str], *, packages: Sequence[str] = ("torch",),
               load_start: str | None = None) -> list[str]:
    """The command, machine, versions and date lines at the top of a benchmark's results file."""
    load = (f"at start {load_start}, " if load_start else "") + f"at the end {load_average()}"
    return [
        f"- command: `{shlex.join(['python', f'benchmarks/{Path(script).name}', *argv])}`",
        f"- machine: {machine()}; load average {load} (the machine is shared)",
        "- " + ", ".join([*(f"{p} {_version(p)}" for p in packages),
                          f"python {platform.python_version()}"]),
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
    ]


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"
