"""A site's global adapter on its own disk, so that a restarted site worker (or a resumed run)
goes on from the round it last applied, and a party that missed rounds can be sent the
current one.

Two versions are kept, the last applied and the one before it: a server that was killed after
some sites applied round r's aggregate but before it recorded round r redoes round r from
r - 1, and those sites step back to it. Files are written atomically (a crash leaves the old
file or the new one, never half of one); the format is safetensors with the round in its
metadata. :func:`adapter_fingerprint` names a state by its content.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ..base.atomic import write_atomic
from ..base.errors import StorageError

CURRENT = "global-adapter.safetensors"
PREVIOUS = "global-adapter.prev.safetensors"


def adapter_fingerprint(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over the sorted names, shapes and float32 values of a LoRA state."""
    h = hashlib.sha256(b"fedshield-adapter-v1")
    for name in sorted(state):
        t = state[name].detach().to(torch.float32).contiguous().cpu()
        h.update(name.encode() + b"\0" + repr(tuple(t.shape)).encode() + b"\0")
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def pack_adapter(version: int, state: Mapping[str, torch.Tensor]) -> bytes:
    """One state and its round as bytes (what a catch-up carries, sealed)."""
    tensors = {k: v.detach().to(torch.float32).contiguous().cpu() for k, v in state.items()}
    return st_save(tensors, metadata={"version": str(int(version))})


def unpack_adapter(blob: bytes, where: str = "adapter") -> tuple[int, dict[str, torch.Tensor]]:
    try:
        state = st_load(bytes(blob))
        version = _version_of(blob)
    except (SafetensorError, ValueError, KeyError, TypeError) as exc:
        raise StorageError(f"{where}: not a saved global adapter ({exc})") from exc
    return version, state


def _version_of(blob: bytes) -> int:
    """The round in a safetensors header's metadata (its first 8 bytes give the length)."""
    size = int.from_bytes(blob[:8], "little")
    if not 0 < size <= len(blob) - 8:
        raise ValueError("bad header length")
    meta = json.loads(blob[8:8 + size]).get("__metadata__") or {}
    version = int(meta["version"])
    if version < 0:
        raise ValueError(f"version {version}")
    return version


def _file_version(path: Path) -> int | None:
    """The round of the adapter file at ``path`` (None: no file), from its header alone: the
    tensors are not read to learn which round a file holds."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            head += f.read(int.from_bytes(head, "little")) if len(head) == 8 else b""
    except FileNotFoundError:
        return None
    try:
        return _version_of(head)
    except (ValueError, KeyError, TypeError) as exc:
        raise StorageError(f"{path}: not a saved global adapter ({exc})") from exc


class AdapterStore:
    """The last two global adapters a site applied, in ``directory`` (its node's own)."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)

    def save(self, version: int, state: Mapping[str, torch.Tensor]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        current = self.directory / CURRENT
        blob = pack_adapter(version, state)
        try:
            kept = _file_version(current)
        except StorageError:
            kept = -1                              # a damaged file: set aside all the same
        if kept is not None and kept != int(version):   # else none yet, or the same round again
            os.replace(current, self.directory / PREVIOUS)
        write_atomic(current, blob, mode=0o600)

    def clear(self) -> None:
        """Forgets both adapters (a new run starts in this directory)."""
        for name in (CURRENT, PREVIOUS):
            (self.directory / name).unlink(missing_ok=True)

    def _read(self, name: str) -> tuple[int, dict[str, torch.Tensor]] | None:
        path = self.directory / name
        if not path.exists():
            return None
        return unpack_adapter(path.read_bytes(), str(path))

    def latest(self) -> tuple[int, dict[str, torch.Tensor]] | None:
        """(round, state) of the last adapter applied here, or None."""
        return self._read(CURRENT)

    def at(self, version: int) -> dict[str, torch.Tensor] | None:
        """The state of round ``version`` if it is one of the two kept."""
        for name in (CURRENT, PREVIOUS):
            if _file_version(self.directory / name) == version:
                return self._read(name)[1]
        return None
