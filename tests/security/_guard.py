"""Run one refusal in a child process under a memory and time guard.

The child is forked from a ``forkserver`` that has already imported torch and d2l_fast and done their lazy
one-off set-up (``_warm``), so a case costs a fork, not an import. What the refusal allocates is the growth of the
child's peak virtual size (``VmPeak``, which equals ``VmSize`` when the child starts): every heap, arena or
``mmap`` allocation grows it, while pages of the already-mapped libraries faulted in by the child do not (they
would inflate a resident-size measure). The address space is also capped (``RLIMIT_AS`` = current size + 4 x the
budget: a hard backstop so a regression fails fast instead of exhausting the machine), and an alarm interrupts the
call after the time budget. The parent reports what the call raised or returned and kills a child that does not
answer.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import resource
import signal
import time
import traceback

MAX_MB = 256  # resident growth allowed while refusing
MAX_S = 10.0  # seconds allowed while refusing
_PRELOAD = ["torch", "d2l_fast", "d2l_fast.checkpoint", "d2l_fast.model", "d2l_fast.cli", "tests.security._warm"]


@dataclasses.dataclass
class Outcome:
    raised: list[str] | None  # the exception's classes (module.qualname, most derived first), None if it returned
    message: str
    returned: object
    peak_mb: float  # growth of the peak virtual size while the call ran
    seconds: float

    def is_a(self, cls: type) -> bool:
        return self.raised is not None and f"{cls.__module__}.{cls.__qualname__}" in self.raised


class _Alarm(BaseException):
    pass


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _on_alarm(signum, frame):
    raise _Alarm(f"still running after {MAX_S} s")


def _child(conn, fn, args, kwargs):
    base_kb = max(_status_kb("VmPeak"), _status_kb("VmSize"))
    vm = _status_kb("VmSize") * 1024
    resource.setrlimit(resource.RLIMIT_AS, (vm + 4 * MAX_MB * 2**20, resource.getrlimit(resource.RLIMIT_AS)[1]))
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, MAX_S)
    t0 = time.perf_counter()
    raised, message, returned = None, "", None
    try:
        returned = fn(*args, **kwargs)
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        raised = [f"{c.__module__}.{c.__qualname__}" for c in type(e).__mro__]
        message = f"{e}\n{''.join(traceback.format_exception(e)[-3:])}" if isinstance(e, _Alarm) else str(e)
    seconds = time.perf_counter() - t0
    signal.setitimer(signal.ITIMER_REAL, 0)
    peak_mb = (_status_kb("VmPeak") - base_kb) / 1024
    try:
        conn.send(Outcome(raised, message, returned if isinstance(returned, (int, str, type(None))) else
                          type(returned).__name__, peak_mb, seconds))
    finally:
        conn.close()
        os._exit(0)


_CTX = None


def _context():
    global _CTX
    if _CTX is None:
        _CTX = multiprocessing.get_context("forkserver")
        _CTX.set_forkserver_preload(_PRELOAD)
    return _CTX


def run_guarded(fn, *args, **kwargs) -> Outcome:
    """``fn(*args, **kwargs)`` in a guarded child; AssertionError if it grew by more than MAX_MB or took more than
    MAX_S (or the child died or hung)."""
    ctx = _context()
    recv, send = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_child, args=(send, fn, args, kwargs), daemon=True)
    p.start()
    send.close()
    try:
        # generous wait: the first case also waits for the forkserver's imports; the child's own alarm is MAX_S
        if not recv.poll(MAX_S + 120):
            raise AssertionError(f"{fn.__qualname__}{args}: no answer (blocked past its alarm?)")
        try:
            out = recv.recv()
        except EOFError:
            raise AssertionError(f"{fn.__qualname__}{args}: the child died (exit code {p.exitcode}; killed for "
                                 "memory?)") from None
    finally:
        if p.is_alive():
            p.kill()
        p.join()
    where = f"{getattr(fn, '__qualname__', fn)}{args}"
    assert out.raised is None or "tests.security._guard._Alarm" not in out.raised, f"{where}: took > {MAX_S} s"
    assert out.seconds <= MAX_S, f"{where}: took {out.seconds:.1f} s (> {MAX_S} s)"
    assert out.peak_mb <= MAX_MB, f"{where}: allocated {out.peak_mb:.0f} MB (> {MAX_MB} MB)"
    return out
