"""Atomic, durable file writes: a fresh temporary file beside the target (O_EXCL, the final
mode from the start), fsynced, then renamed over the target. A reader sees the old file or the
new one, never half of one, and a crash leaves the previous version in place."""

from __future__ import annotations

import json
import os


def write_atomic(path: str | os.PathLike, data: bytes, mode: int = 0o644) -> None:
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}-{os.urandom(4).hex()}"
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json_atomic(path: str | os.PathLike, obj, indent: int | None = 2) -> None:
    write_atomic(path, json.dumps(obj, indent=indent).encode())


def replace_durably(tmp: str | os.PathLike, final: str | os.PathLike) -> None:
    """For files another library wrote to `tmp` (e.g. safetensors): fsync, then rename."""
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, final)
