"""The machine line every benchmark writes at the top of its results file."""

from __future__ import annotations

import os
import platform
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
