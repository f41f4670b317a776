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
