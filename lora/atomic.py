"""Crash-safe file writes: a reader sees the old file or the complete new one, never a torn one."""
from __future__ import annotations

import contextlib
import json
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from safetensors.torch import save_file
from torch import Tensor

__all__ = ["atomic_path", "atomic_write", "save_safetensors"]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary file's path beside ``path``, for a writer that opens files by name; on success
    fsyncs that file and renames it over ``path``.

    The rename is atomic on POSIX and Windows when both names are on one file system, which the
    same folder guarantees. On an exception the temporary file is removed and ``path`` is untouched. A
    symbolic link is written through, as ``open(path, "w")`` would: its target gets the new file. A read-only
    file is replaced, keeping its mode, where the folder is writable (a plain open would refuse it): under a
    umask of 0o222 every file a run writes is read-only, and the run rewrites them each epoch.
    """
    path = Path(os.path.realpath(path)) if os.path.islink(path) else Path(path)
    if path.exists() and not path.is_file():  # a folder, a device such as /dev/null, a pipe: not ours to replace
        raise ValueError(f"'{path}' exists and is not a regular file; the file is written beside it and renamed "
                         f"over it, which would replace it: give a file's path")
    path.parent.mkdir(parents=True, exist_ok=True)
    # The name's first 40 characters (160 bytes at most in UTF-8) and 14 of its own: a name of the 255 bytes a
    # file system allows still has a temporary file.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:40]}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        os.chmod(tmp, 0o600)  # mkstemp's 0600 less the umask: a umask of 0o222 would leave the writer a read-only file
        yield Path(tmp)
        # Synced before its mode is set: under a umask of 0o222 that mode leaves even the owner no write bit.
        # Windows commits only a handle open for writing; elsewhere a read-only one suffices, whatever mode a
        # writer that recreated the file gave it.
        fd = os.open(tmp, os.O_RDWR if os.name == "nt" else os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, _plain_open_mode(path))  # 0600 until now; set after the writer, which may recreate the file
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):  # gone already, or not ours to remove: the first error is the one to see
            os.chmod(tmp, 0o600)  # Windows removes no read-only file
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable; not possible on every OS
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _plain_open_mode(path: Path) -> int:
    """The permissions ``open(path, "w")`` would leave: an existing file's own, else 0666 less the umask."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return 0o666 & ~_umask()


def _umask() -> int:
    """The process's umask. Linux shows it in /proc; elsewhere reading it means setting it and putting it back,
    a moment in which another thread's new files would get mode 0666."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    umask = os.umask(0)
    os.umask(umask)
    return umask


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """``atomic_path`` for a file object: opens the temporary file in ``mode`` (text as UTF-8)."""
    with atomic_path(path) as tmp, open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
        yield f


def save_safetensors(tensors: dict[str, Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """``tensors`` (moved to the CPU, made contiguous) as a safetensors file, atomically. Written from the
    tensors' own memory: no copy of the file is built in RAM (``safetensors.torch.save`` would hold two)."""
    for key, value in (metadata or {}).items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"safetensors metadata maps strings to strings, and {key!r} maps to "
                            f"{type(value).__name__} {value!r}; pass str(value) or json.dumps(value)")
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)
        if metadata:
            _sort_metadata(tmp)


def _sort_metadata(path: str | os.PathLike) -> None:
    """Rewrites a safetensors header in place with its metadata in key order: safetensors writes the metadata
    from a hash map, in an order that changes from one call to the next, so the same weights and metadata
    gave other bytes (another SHA-256) each time. The header keeps its length (the same JSON, reordered)."""
    with open(path, "r+b") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps({"__metadata__": header.pop("__metadata__"), **header}, separators=(",", ":"),
                          ensure_ascii=False).encode()
        if len(text) <= size:  # always so: the same keys and values, and safetensors' own compact JSON
            f.seek(8)
            f.write(text + b" " * (size - len(text)))
