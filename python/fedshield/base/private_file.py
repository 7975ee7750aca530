"""Files only their owner reads: logs and specs that may name a site's files or carry an
environment's secrets. Mode 0600 from creation, and an existing file narrowed to it."""

from __future__ import annotations

import os


def open_private(path: str | os.PathLike) -> int:
    """A descriptor of ``path`` for writing, the file created or truncated, mode 0600 (a file
    that existed with a wider mode is narrowed before anything is written)."""
    fd = os.open(path, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o600)
    try:
        os.fchmod(fd, 0o600)
    except BaseException:
        os.close(fd)
        raise
    return fd
