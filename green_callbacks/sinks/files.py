"""Files this package writes beside a spool, never through a link a local user planted (``open_own``,
``write_own``), and the lock that lets one sender or replay at a time send a spool (``lock``)."""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path
from typing import Any


def open_own(path: Path, flags: int, mode: int = 0o600) -> int:
    """``os.open`` for a file this package writes beside a spool, never through a link: a symbolic link planted at
    the name (or a hard link to another file: a second name for it) is removed and the file made anew, so what is
    written lands in a file of its own, not in the link's target (``~/.bashrc``). ``O_TRUNC`` is applied only once
    the file is known to be its own (a hard link's target is never emptied); a FIFO at the name does not block."""
    truncate = bool(flags & os.O_TRUNC)
    flags = (flags & ~os.O_TRUNC) | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0) | \
        getattr(os, "O_NONBLOCK", 0)
    for _ in range(3):
        try:
            fd = os.open(path, flags, mode)
        except OSError:
            if not path.is_symlink():
                raise
            path.unlink()  # (ELOOP: a link at the name)
            continue
        info = os.fstat(fd)
        if stat.S_ISREG(info.st_mode) and info.st_nlink <= 1:
            if hasattr(os, "set_blocking"):
                os.set_blocking(fd, True)
            if truncate:
                os.ftruncate(fd, 0)
            return fd
        os.close(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(f"{path} is not a regular file; nothing is written there") from None
        path.unlink()  # a hard link: this name only goes
    raise OSError(f"{path}: links keep appearing at this name; nothing is written there")


def write_own(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` whole (readers see the old content or the new, never half), through a temporary
    file of a name nobody can guess or plant a link at beforehand, never through a link at ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)  # (a link at ``path`` is replaced, not followed)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def last_byte(path: Path) -> bytes:
    with path.open("rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1)


def lock(spool: Path) -> Any:
    """An exclusive lock on the spool (one sender or replay at a time), or None when another holds it.

    The training appends without locking (the lock is advisory); the lock dies with its process.
    """
    f = spool.open("rb")
    try:
        import fcntl
    except ImportError:  # no fcntl (Windows): one sender per spool by construction
        return f
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        return None
    return f
