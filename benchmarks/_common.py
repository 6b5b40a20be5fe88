"""What the benchmark suites share: peak-memory and CPU-contention measurement on Linux (``/proc``).

The suites import it relatively (``from .._common import CpuMonitor``): ``benchmarks/`` is a package, collected by
pytest from the repository root (``pytest benchmarks --benchmark-only``).
"""

from __future__ import annotations

import ctypes
import gc
import os
import threading
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


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                                               "uordblks", "fordblks", "keepcost")]


def malloc_stats_mb() -> dict | None:
    """glibc's heap over all arenas (``mallinfo2``, glibc >= 2.33), in MiB: ``heap`` (arena bytes obtained with
    brk/mmap for small blocks), ``in_use`` (allocated in them), ``free`` (freed, kept by the allocator: where this
    grows while ``in_use`` does not, memory is fragmented, not leaked) and ``mmapped`` (large blocks, each its own
    mapping, e.g. tensors). None where unavailable (not glibc, older glibc)."""
    try:
        fn = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2
    m, mib = fn(), float(2**20)
    return {"heap": round(m.arena / mib, 1), "in_use": round(m.uordblks / mib, 1), "free": round(m.fordblks / mib, 1),
            "mmapped": round(m.hblkhd / mib, 1)}


class RssSampler:
    """RSS of this process sampled every ``interval_s`` in a daemon thread (``sample()`` takes one at once):
    ``peak_mb``, and ``series`` as (seconds since start, MiB) at most every ``keep_every_s``."""

    def __init__(self, interval_s: float = 1.0, keep_every_s: float = 10.0):
        if not interval_s > 0 or not keep_every_s > 0:
            raise ValueError(f"interval_s and keep_every_s must be > 0, got {interval_s}, {keep_every_s}")
        self.interval_s, self.keep_every_s = float(interval_s), float(keep_every_s)
        self.peak_mb = 0.0
        self.series: list[tuple[float, float]] = []
        self._t0 = time.monotonic()
        self._stop = None
        self._thread = None

    def sample(self) -> float:
        mb = proc_status_kb("VmRSS") / 1024
        self.peak_mb = max(self.peak_mb, mb)
        t = time.monotonic() - self._t0
        if not self.series or t - self.series[-1][0] >= self.keep_every_s:
            self.series.append((round(t, 1), round(mb, 1)))
        return mb

    def start(self) -> "RssSampler":
        self._stop = threading.Event()

        def loop():
            while not self._stop.wait(self.interval_s):
                self.sample()

        self.sample()
        self._thread = threading.Thread(target=loop, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        self.sample()


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
