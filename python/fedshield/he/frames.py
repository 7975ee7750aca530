"""The framing of threshold-mode messages (key generation steps, key shares, partial
decryptions): magic, version, a JSON head, byte sections, and a trailer over all of it.

The trailer detects corruption, not forgery: anyone relaying a frame can recompute it. Frames
are written with the wire format's 64-bit checksum (``native.checksum64``, at memory speed and
on every core; bit 15 of the version field says so); frames written before it carry a SHA-256
trailer instead, and still read.
"""

from __future__ import annotations

import hashlib
import json
import struct
from typing import Sequence

from .. import native
from ..base.validate import is_int

VERSION = 1
DIGEST = 32       # the longest trailer (SHA-256), for size bounds
CHECKSUM = 8      # the trailer of frames written now
CHECKSUMMED = 0x8000  # in the version field: the trailer is CHECKSUM bytes of checksum64


def frame(magic: bytes, meta: dict, sections: Sequence[bytes], version: int = VERSION) -> bytes:
    if not 0 <= version < CHECKSUMMED:
        raise ValueError(f"frame version {version} must be below {CHECKSUMMED}")
    head = json.dumps({**meta, "sizes": [len(s) for s in sections]}, sort_keys=True).encode()
    body = b"".join([magic, struct.pack("<HI", version | CHECKSUMMED, len(head)), head,
                     *sections])
    return body + struct.pack("<Q", native.checksum64(body))


def unframe(blob, magic: bytes, what: str, error: type, version: int = VERSION, *,
            views: bool = False) -> tuple[dict, list]:
    """(head, sections) of a frame of ``version``; ``error`` (naming ``what``) for anything
    malformed. ``views``: the sections as read-only memoryviews of the frame's bytes instead of
    copies (a caller that only reads them, such as the native fusion, saves copying them)."""
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise TypeError(f"{what}: expected bytes, got {type(blob).__name__}")
    blob = bytes(blob)
    fixed = len(magic) + 6
    if len(blob) < fixed + CHECKSUM or blob[:len(magic)] != magic:
        raise error(f"not a fedshield {what} (bad magic or too short)")
    got, head_len = struct.unpack_from("<HI", blob, len(magic))
    trailer = CHECKSUM if got & CHECKSUMMED else DIGEST
    if len(blob) < fixed + trailer:
        raise error(f"not a fedshield {what} (too short)")
    body = memoryview(blob)[:-trailer]  # views: only the sections are copied out
    if got & CHECKSUMMED:
        intact = struct.pack("<Q", native.checksum64(body)) == blob[-trailer:]
    else:  # written before the checksum: SHA-256
        intact = hashlib.sha256(body).digest() == blob[-trailer:]
    if not intact:
        raise error(f"{what} bytes are corrupted (digest mismatch)")
    if got & ~CHECKSUMMED != version:
        raise error(f"{what} format version {got & ~CHECKSUMMED} is not supported (expected "
                    f"{version})")
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
