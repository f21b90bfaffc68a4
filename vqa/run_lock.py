"""One training process at a time on a run folder: an advisory lock the process training it holds."""
from __future__ import annotations

import os
import weakref
from pathlib import Path

__all__ = ["RunLock"]


class RunLock:
    """An advisory lock on a run folder, held by the process that trains it, so that a second ``train.py`` on
    the same run (a resume started while the run still trains, an ``--overwrite``) is refused instead of
    writing the same files. ``flock`` on the folder itself, which puts no file in it; where there is no
    ``flock`` (Windows) or the file system has no locks, nothing is locked."""

    def __init__(self, run: Path) -> None:
        self.run, self.fd = run, None

    def take(self) -> bool:
        """Takes the lock where the folder exists; False where another process holds it."""
        try:
            import fcntl
        except ImportError:  # Windows
            return True
        if self.fd is not None or not self.run.is_dir():
            return True
        fd = os.open(self.run, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            return not isinstance(e, BlockingIOError)  # held elsewhere, or (True) a file system without locks
        self.fd = fd
        _held_locks.add(self)
        global _fork_hook
        if not _fork_hook:
            os.register_at_fork(after_in_child=_drop_held_locks)
            _fork_hook = True
        return True

    def release(self) -> None:
        if self.fd is not None:
            _held_locks.discard(self)
            os.close(self.fd)
            self.fd = None


_held_locks: "weakref.WeakSet[RunLock]" = weakref.WeakSet()
_fork_hook = False


def _drop_held_locks() -> None:
    """In a forked child (a DataLoader worker), closes its copies of the held locks' descriptors: a lock lasts
    while any copy is open, and a worker outlives a killed parent by seconds, which would keep a resume out."""
    for lock in list(_held_locks):
        os.close(lock.fd)
        lock.fd = None
    _held_locks.clear()
