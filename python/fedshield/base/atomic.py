"""Atomic, durable file writes: a fresh temporary file beside the target (O_EXCL, the final
mode from the start), fsynced, then renamed over the target. A reader sees the old file or the
new one, never half of one, and a crash leaves the previous version in place.

A write that fails (a full disk, a read-only directory, an I/O error) raises StorageError
naming the path, removes its temporary file and leaves the previous file as it was.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from pathlib import Path
from typing import Iterator

from .errors import StorageError


def _storage_error(path: str, exc: OSError, kept: bool = True) -> StorageError:
    reason = exc.strerror or str(exc)
    code = errno.errorcode.get(exc.errno, exc.errno) if exc.errno is not None else None
    tail = "; the previous version is unchanged" if kept else ""
    return StorageError(f"cannot write {path!r}: {reason}" + (f" ({code})" if code else "")
                        + tail)


def _tmp_name(path: str) -> str:
    return f"{path}.tmp-{os.getpid()}-{os.urandom(4).hex()}"


def _fsync_directory(path: str) -> None:
    """Makes a rename in ``path`` durable (best effort: some filesystems refuse it)."""
    try:
        fd = os.open(path or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: str | os.PathLike, data: bytes, mode: int = 0o644) -> None:
    path = os.fspath(path)
    tmp = _tmp_name(path)
    try:
        fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, mode)
    except OSError as exc:
        raise _storage_error(path, exc) from exc
    try:
        try:
            view = memoryview(data).cast("B")
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise _storage_error(path, exc) from exc
        raise
    _fsync_directory(os.path.dirname(path))


def write_json_atomic(path: str | os.PathLike, obj, indent: int | None = 2) -> None:
    write_atomic(path, json.dumps(obj, indent=indent).encode())


def _fsync_tree(root: str) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_directory(folder)


@contextlib.contextmanager
def replacing_directory(path: str | os.PathLike,
                        write_errors: tuple[type[BaseException], ...] = ()) -> Iterator[Path]:
    """Yields a fresh directory beside ``path`` for a library to write into (e.g. PEFT's
    save_pretrained). When the block succeeds its files are fsynced and it replaces ``path``
    (the old directory is renamed aside, the new one renamed in, the old one removed); when
    the block fails, it is removed and ``path`` is untouched. An OSError on the way, or one of
    ``write_errors`` (a library's own error for a failed write), is a StorageError naming
    ``path``."""
    path = os.fspath(path)
    tmp = _tmp_name(path)
    try:
        os.mkdir(tmp)
    except OSError as exc:
        raise _storage_error(path, exc) from exc
    try:
        yield Path(tmp)
        _fsync_tree(tmp)
        old = None
        if os.path.lexists(path):
            old = _tmp_name(path) + ".old"
            os.rename(path, old)
        try:
            os.rename(tmp, path)
        except BaseException:
            if old is not None:
                os.rename(old, path)
            raise
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise _storage_error(path, exc) from exc
        if isinstance(exc, write_errors):
            raise StorageError(f"cannot write {path!r}: {exc}; the previous version is "
                               "unchanged") from exc
        raise
    _fsync_directory(os.path.dirname(path))
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
