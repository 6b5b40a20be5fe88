"""Sharing one base model between threads: ordinary forwards run side by side, encoder passes run alone, in slices.

A context-encoder pass changes state that every forward of the model reads: it switches the attention
implementation on the model's config (:mod:`d2l_fast.varlen`) and installs forward hooks on decoder
layers (:mod:`d2l_fast.encoder`). Adapter bindings are per thread already (:class:`d2l_fast.patching.LoRAContext`).
So every base model gets one :class:`ModelLock`, kept on its decoder: each forward of the decoder holds it
*shared* (any number at once, e.g. the decode steps of concurrent ``generate`` calls) and each encoder pass
holds it *exclusive*. Both holds are reentrant per thread: the encoder's own decoder forward passes straight
through.

Encoder passes are sliced (as chunked prefill is in vLLM): between two decoder layers the encoder calls
:meth:`ModelLock.yield_to_readers`, which puts the shared state back, lets every forward queued at that moment
run, and resumes. The lock is fair by tickets: a reader that has to wait takes a ticket, and every release of
the exclusive hold (the end of a pass or a yield) grants all tickets issued so far; a writer — also the one that
just released — acquires only once the granted readers have entered and left. So a queued forward waits for at
most one slice (one decoder layer of one encoder pass: a packed row, or a window of one), and a waiting writer
still blocks forwards that arrive after it (no writer starvation either).

The lock counts what it does, so the schedule can be checked by state: ``slices`` (slices of exclusive holds
begun: at each acquire and at each yield), ``max_slices_waited`` (the most slices that began while one reader
waited: at most 1 by the rule above, the one a writer waiting at the reader's arrival runs first) and
``longest_slice`` (seconds, what): the longest stretch of an exclusive hold between two points where a reader
could get in (acquire, :meth:`yield_to_readers`, release), i.e. the longest a queued forward could have waited,
and the ``what`` its :meth:`exclusive` was given; slices longer than ``slow_slice_s`` are logged at DEBUG.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time

from torch import nn

_CREATE = threading.Lock()
logger = logging.getLogger(__name__)


class ModelLock:
    """A reentrant readers-writer lock that hands over to queued readers at every release or yield of a writer."""

    def __deepcopy__(self, memo):  # a copied model gets its own, free lock
        return ModelLock()

    def __reduce__(self):
        return (ModelLock, ())

    def __init__(self):
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer: int | None = None
        self._writer_depth = 0
        self._writers_waiting = 0
        self._readers_waiting = 0
        self._next_ticket = 0  # tickets of readers that had to wait
        self._grant = 0  # readers holding a ticket below this enter even while a writer waits
        self._granted_waiting = 0  # granted readers that have not entered yet (writers wait for them)
        self._local = threading.local()
        self.handovers = 0  # releases / yields of a writer that let queued readers run
        self.slices = 0  # slices of exclusive holds begun (at an acquire, and at every yield)
        self.max_slices_waited = 0  # the most slices begun while one reader waited
        self.longest_slice: tuple[float, str] = (0.0, "")  # (seconds, what): see the module docstring
        self.slow_slice_s = 0.25  # slices longer than this are logged at DEBUG
        self._slice_start = 0.0
        self._what = ""

    @property
    def readers_waiting(self) -> int:
        """Forwards queued behind a writer right now."""
        return self._readers_waiting

    @property
    def writer_active(self) -> bool:
        return self._writer is not None

    @contextlib.contextmanager
    def shared(self):
        me = threading.get_ident()
        depth = getattr(self._local, "depth", 0)
        counted = False
        if depth == 0 and self._writer != me:
            with self._cond:
                if self._writer is not None or self._writers_waiting:
                    ticket, s0 = self._next_ticket, self.slices
                    self._next_ticket += 1
                    self._readers_waiting += 1
                    try:
                        while self._writer is not None or (self._writers_waiting and ticket >= self._grant):
                            self._cond.wait()
                    finally:
                        self._readers_waiting -= 1
                        if ticket < self._grant:
                            self._granted_waiting -= 1
                        self.max_slices_waited = max(self.max_slices_waited, self.slices - s0)
                self._readers += 1
            counted = True
        self._local.depth = depth + 1
        try:
            yield
        finally:
            self._local.depth = depth
            if counted:
                with self._cond:
                    self._readers -= 1
                    if self._readers == 0:
                        self._cond.notify_all()

    def _acquire_writer(self, me: int, depth: int) -> None:  # with self._cond held
        self._writers_waiting += 1
        try:
            while self._writer is not None or self._readers or self._granted_waiting:
                self._cond.wait()
        finally:
            self._writers_waiting -= 1
        self._writer, self._writer_depth = me, depth
        self.slices += 1
        self._slice_start = time.perf_counter()

    def _end_slice(self) -> None:  # by the writer: a point where queued readers may get in
        now = time.perf_counter()
        took, self._slice_start = now - self._slice_start, now
        if took > self.longest_slice[0]:
            self.longest_slice = (took, self._what)
        if took > self.slow_slice_s:
            logger.debug("the model lock was held exclusively for %.3f s without a yield (%s)", took,
                         self._what or "unnamed")

    def _release_writer(self) -> None:  # with self._cond held
        self._end_slice()
        self._writer, self._writer_depth = None, 0
        if self._readers_waiting:  # every reader queued now goes before any writer (the releasing one too)
            self._grant = self._next_ticket
            self._granted_waiting = self._readers_waiting
            self.handovers += 1
        self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self, what: str = ""):
        """Hold the lock alone (reentrant); ``what`` names the hold in ``longest_slice`` and the DEBUG log (the
        outermost hold's name counts)."""
        if not isinstance(what, str):
            raise TypeError(f"what must be a str, got {type(what).__name__}")
        me = threading.get_ident()
        with self._cond:
            if self._writer == me:
                self._writer_depth += 1
            else:
                if getattr(self._local, "depth", 0):
                    raise RuntimeError("a context-encoder pass cannot start inside a forward of the same model "
                                       "(it would wait for itself)")
                self._acquire_writer(me, 1)
                self._what = what
        try:
            yield
        finally:
            with self._cond:
                self._writer_depth -= 1
                if self._writer_depth == 0:
                    self._release_writer()

    def yield_to_readers(self, pause=None, resume=None) -> bool:
        """Called by the thread holding the exclusive hold: if forwards are queued, let them run, then hold again.

        ``pause()`` runs (still exclusive) before the hand-over and should put back the shared state the writer
        changed; ``resume()`` runs once the hold is back. Returns whether forwards were waiting (False: nothing
        happened).
        """
        me = threading.get_ident()
        with self._cond:
            if self._writer != me:
                raise RuntimeError("yield_to_readers needs the exclusive hold of the calling thread")
            if not self._readers_waiting:
                self._end_slice()  # a reader arriving from now on waits for this next slice only
                self.slices += 1
                return False
            depth = self._writer_depth
        if pause is not None:
            pause()
        with self._cond:
            self._release_writer()
            self._acquire_writer(me, depth)
        if resume is not None:
            resume()
        return True


def model_lock(model: nn.Module) -> ModelLock:
    """The lock of ``model`` (created on first use, stored on the module)."""
    lock = model.__dict__.get("_d2l_model_lock")
    if lock is None:
        with _CREATE:
            lock = model.__dict__.get("_d2l_model_lock")
            if lock is None:
                lock = ModelLock()
                model.__dict__["_d2l_model_lock"] = lock
    return lock


def _guarded_forward(self, *args, **kwargs):
    with model_lock(self).shared():
        return self._d2l_unguarded_forward(*args, **kwargs)


def guard_forward(module: nn.Module) -> None:
    """Make every forward of ``module`` hold :func:`model_lock` ``(module)`` shared (idempotent).

    The forward is replaced on the instance by a bound method (like the patched Linears), so ``copy.deepcopy``
    and pickling give a copy guarded by its own lock.
    """
    with _CREATE:
        if "_d2l_unguarded_forward" in module.__dict__:
            return
        module._d2l_unguarded_forward = module.forward
        module.forward = _guarded_forward.__get__(module, type(module))


__all__ = ["ModelLock", "guard_forward", "model_lock"]
