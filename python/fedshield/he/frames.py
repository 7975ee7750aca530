"""The framing of threshold-mode messages (key generation steps, key shares, partial
decryptions): magic, version, a JSON head, byte sections, and a SHA-256 of all of it.

The digest detects corruption, not forgery: anyone relaying a frame can recompute it.
"""

from __future__ import annotations

import hashlib
import json
import struct
from typing import Sequence

from ..base.validate import is_int

VERSION = 1
DIGEST = 32


def frame(magic: bytes, meta: dict, sections: Sequence[bytes], version: int = VERSION) -> bytes:
    head = json.dumps({**meta, "sizes": [len(s) for s in sections]}, sort_keys=True).encode()
    parts = [magic, struct.pack("<HI", version, len(head)), head, *sections]
    digest = hashlib.sha256()
    for part in parts:  # hashed piece by piece: the body is joined once, with its digest
        digest.update(part)
    return b"".join([*parts, digest.digest()])


def unframe(blob, magic: bytes, what: str, error: type, version: int = VERSION, *,
            views: bool = False) -> tuple[dict, list]:
    """(head, sections) of a frame of ``version``; ``error`` (naming ``what``) for anything
    malformed. ``views``: the sections as read-only memoryviews of the frame's bytes instead of
    copies (a caller that only reads them, such as the native fusion, saves copying them)."""
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise TypeError(f"{what}: expected bytes, got {type(blob).__name__}")
    blob = bytes(blob)
    fixed = len(magic) + 6
    if len(blob) < fixed + DIGEST or blob[:len(magic)] != magic:
        raise error(f"not a fedshield {what} (bad magic or too short)")
    body = memoryview(blob)[:-DIGEST]  # views: only the sections are copied out
    if hashlib.sha256(body).digest() != blob[-DIGEST:]:
        raise error(f"{what} bytes are corrupted (digest mismatch)")
    got, head_len = struct.unpack_from("<HI", blob, len(magic))
    if got != version:
        raise error(f"{what} format version {got} is not supported (expected {version})")
    try:
        meta = json.loads(bytes(body[fixed:fixed + head_len]))
        if not isinstance(meta, dict):
            raise ValueError("head is not an object")
        sections, at = [], fixed + head_len
        for size in meta["sizes"]:
            if not (isinstance(size, int) and size >= 0):
                raise ValueError(f"section size {size!r}")
            sections.append(body[at:at + size] if views else bytes(body[at:at + size]))
            at += size
        if at != len(body):
            raise ValueError("section sizes do not add up")
    except (KeyError, ValueError, TypeError, RecursionError) as exc:
        raise error(f"malformed {what}: {exc}") from exc
    return meta, sections


def int_field(meta: dict, name: str, what: str, error: type, low: int = 0,
              high: int = 2**63) -> int:
    """meta[name] as an int in [low, high); ``error`` otherwise (bools are not ints here)."""
    value = meta.get(name)
    if not (is_int(value) and low <= value < high):
        raise error(f"malformed {what}: {name}={value!r}")
    return value
