"""Opening user-supplied files safely: regular files only, never blocking, read with a bound.

Every file the package reads on a user's behalf (checkpoints, ``d2l_config.json``, adapter files, the
server's store, training data) goes through :func:`check_regular_file` (before a library such as
safetensors or pyarrow opens the path) or :func:`read_bytes` / :func:`read_text` / :func:`open_regular`
(when the package reads it itself). A device (``/dev/zero``, ``/dev/urandom``), a FIFO, a socket or a folder
— also behind a symbolic link — is refused before it is opened, so nothing reads without end and nothing
blocks waiting for a writer. The path is opened with ``O_NONBLOCK`` and checked again on the open descriptor
(a path swapped for a FIFO between the check and the open is refused too), and reads stop at ``max_bytes``.

It depends on nothing else in the package; callers pass the exception class to raise (e.g.
:class:`~d2l_fast.CheckpointError`), which must accept one message argument.
"""

from __future__ import annotations

import json
import os
import stat

_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"))


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def _refuse(path, mode: int, what: str, error):
    return error(f"{path}: the {what} is {_kind(mode)}, not a regular file; refusing to read it")


def check_regular_file(path, *, what: str = "file", max_bytes: int | None = None, error=ValueError) -> os.stat_result:
    """``os.stat`` of ``path`` (symbolic links followed) if it is a regular file of at most ``max_bytes``.

    Raises ``error`` naming the path otherwise (missing, unreadable, a device, FIFO, socket or folder, too large).
    Opens nothing, so it never blocks.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise error(f"{path}: the {what} does not exist (or is a broken symbolic link)") from None
    except (OSError, ValueError) as e:  # ValueError: an embedded NUL byte
        raise error(f"{path}: the {what} cannot be read: {e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise _refuse(path, st.st_mode, what, error)
    if max_bytes is not None and st.st_size > max_bytes:
        raise error(f"{path}: the {what} is {st.st_size} bytes, at most {max_bytes} are accepted")
    return st


def open_regular(path, *, what: str = "file", max_bytes: int | None = None, error=ValueError):
    """A binary file object of ``path``, opened without blocking and verified to be a regular file (``fstat``)."""
    check_regular_file(path, what=what, max_bytes=max_bytes, error=error)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise error(f"{path}: the {what} cannot be opened: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):  # swapped after the check
            raise _refuse(path, st.st_mode, what, error)
        if max_bytes is not None and st.st_size > max_bytes:
            raise error(f"{path}: the {what} is {st.st_size} bytes, at most {max_bytes} are accepted")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)  # a regular file: ordinary reads from here on
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_bytes(path, max_bytes: int, *, what: str = "file", error=ValueError) -> bytes:
    """The whole content of the regular file ``path``; ``error`` if it holds more than ``max_bytes`` (read bounded:
    a file that grows after the check is not read past ``max_bytes + 1`` bytes)."""
    with open_regular(path, what=what, max_bytes=max_bytes, error=error) as f:
        try:
            data = f.read(max_bytes + 1)
        except OSError as e:
            raise error(f"{path}: the {what} cannot be read: {e.strerror or e}") from None
    if len(data) > max_bytes:
        raise error(f"{path}: the {what} holds more than {max_bytes} bytes")
    return data


def read_text(path, max_bytes: int, *, what: str = "file", error=ValueError, encoding: str = "utf-8") -> str:
    """:func:`read_bytes` decoded; ``error`` naming the byte offset if it is not valid ``encoding``."""
    data = read_bytes(path, max_bytes, what=what, error=error)
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as e:
        raise error(f"{path}: the {what} is not {encoding} text ({e.reason} at byte {e.start})") from None


class LongInteger(str):
    """A JSON integer literal of more than :data:`MAX_INT_DIGITS` digits, kept as its text: the field holding it is
    then refused by name by the field's own validation (``... must be an integer, got <integer of 5000 digits>``),
    instead of Python's limit on int conversion failing the whole parse without naming it."""

    def __repr__(self) -> str:
        return f"<integer of {len(self.lstrip('-'))} digits>"


MAX_INT_DIGITS = 64


def _bounded_int(s: str):
    return int(s) if len(s) <= MAX_INT_DIGITS else LongInteger(s)


def read_json(path, max_bytes: int, *, what: str = "file", error=ValueError):
    """:func:`read_text` parsed as JSON; integers of more than :data:`MAX_INT_DIGITS` digits stay
    :class:`LongInteger` text. ``error`` naming the file for unreadable, too large, or invalid (or too deeply
    nested) JSON."""
    text = read_text(path, max_bytes, what=what, error=error)
    try:
        return json.loads(text, parse_int=_bounded_int)
    except RecursionError:
        raise error(f"{path}: unreadable {what}: JSON nested too deeply") from None
    except ValueError as e:  # json.JSONDecodeError, and Python's own limits on number conversion
        raise error(f"{path}: unreadable {what}: {e}") from None


__all__ = ["LongInteger", "check_regular_file", "open_regular", "read_bytes", "read_json", "read_text"]
