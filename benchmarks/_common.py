"""What the benchmark suites share: peak-memory and CPU-contention measurement on Linux (``/proc``).

The suites import it relatively (``from .._common import CpuMonitor``): ``benchmarks/`` is a package, collected by
pytest from the repository root (``pytest benchmarks --benchmark-only``).
"""

from __future__ import annotations

import ctypes
import gc
import os
import time


# ----------------------------------------------------------------------------------------------- memory
def proc_status_kb(field: str) -> int:
    """A ``/proc/self/status`` field in kB (``VmRSS``, ``VmHWM``)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def malloc_trim() -> None:
    """Return freed heap pages to the OS (glibc ``malloc_trim(0)``; a no-op elsewhere)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


class PeakRSS:
    """Peak memory of a call: growth of VmHWM over the RSS at ``reset()`` (``/proc/self/clear_refs`` resets the
    high-water mark; ``ok`` is False where that is missing)."""

    def __init__(self):
        self.ok = os.path.exists("/proc/self/clear_refs")
        self.rss0_kb = 0
        self.peaks_mb: list[float] = []

    def reset(self) -> None:
        gc.collect()
        malloc_trim()
        if not self.ok:
            return
        try:
            self.rss0_kb = proc_status_kb("VmRSS")
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            self.ok = False

    def record(self) -> None:
        if self.ok:
            self.peaks_mb.append((proc_status_kb("VmHWM") - self.rss0_kb) / 1024)

    @property
    def peak_mb(self) -> float | None:
        return round(max(self.peaks_mb), 1) if self.peaks_mb else None


# ----------------------------------------------------------------------------------------- contamination
_CLK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _busy_s() -> float:
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return (sum(v[:8]) - idle) / _CLK


class CpuMonitor:
    """CPU seconds per second that other processes used while we ran (0 = quiet machine)."""

    def __init__(self):
        self.wall = self.busy = self.own = 0.0
        self._t = None

    def start(self):
        t = os.times()
        self._t = (time.perf_counter(), _busy_s(), t.user + t.system)

    def stop(self):
        t = os.times()
        w0, b0, o0 = self._t
        self.wall += time.perf_counter() - w0
        self.busy += _busy_s() - b0
        self.own += t.user + t.system - o0

    @property
    def other_cores(self) -> float | None:
        return round(max(0.0, self.busy - self.own) / self.wall, 2) if self.wall > 0 else None



def mem_available_bytes() -> int | None:
    """``MemAvailable`` of ``/proc/meminfo`` in bytes; None where it cannot be read."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
