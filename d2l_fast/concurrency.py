"""Sharing one base model between threads: ordinary forwards run side by side, encoder passes run alone.

A context-encoder pass changes state that every forward of the model reads: it switches the attention
implementation on the model's config (:mod:`d2l_fast.varlen`) and installs forward hooks on decoder
layers (:mod:`d2l_fast.encoder`). Adapter bindings are per thread already (:class:`d2l_fast.patching.LoRAContext`).
So every base model gets one :class:`ModelLock`, kept on its decoder: each forward of the decoder holds it
*shared* (any number at once, e.g. the decode steps of concurrent ``generate`` calls) and each encoder pass
holds it *exclusive*. A waiting encoder pass blocks new forwards (no starvation), so a ``generate`` in
another thread pauses between two decode steps while one packed encoder row runs, then continues. Both
holds are reentrant per thread: the encoder's own decoder forward passes straight through.
"""

from __future__ import annotations

import contextlib
import threading

from torch import nn

_CREATE = threading.Lock()


class ModelLock:
    """A reentrant readers-writer lock (writer-preferring)."""

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
        self._local = threading.local()

    @contextlib.contextmanager
    def shared(self):
        me = threading.get_ident()
        depth = getattr(self._local, "depth", 0)
        counted = False
        if depth == 0 and self._writer != me:
            with self._cond:
                while self._writer is not None or self._writers_waiting:
                    self._cond.wait()
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

    @contextlib.contextmanager
    def exclusive(self):
        me = threading.get_ident()
        with self._cond:
            if self._writer == me:
                self._writer_depth += 1
            else:
                if getattr(self._local, "depth", 0):
                    raise RuntimeError("a context-encoder pass cannot start inside a forward of the same model "
                                       "(it would wait for itself)")
                self._writers_waiting += 1
                try:
                    while self._writer is not None or self._readers:
                        self._cond.wait()
                finally:
                    self._writers_waiting -= 1
                self._writer, self._writer_depth = me, 1
        try:
            yield
        finally:
            with self._cond:
                self._writer_depth -= 1
                if self._writer_depth == 0:
                    self._writer = None
                    self._cond.notify_all()


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
