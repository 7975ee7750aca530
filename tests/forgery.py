"""Byte mutations and forgeries of valid messages, for the fuzz targets and the tests of
hostile input: one mutator for hypothesis strategies and seeded random sources, re-sealing
(what a forger who recomputes an unkeyed digest or checksum does), and context files taken
apart and rebuilt."""

from __future__ import annotations

import hashlib
import json
import random
import struct

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from fedshield import native
from fedshield.he.context import CONTEXT_FORMAT_VERSION as CONTEXT_VERSION
from fedshield.he.frames import CHECKSUMMED


def fuzz_settings(examples: int) -> settings:
    """Deterministic hypothesis settings for a fuzz target: ``examples`` cases, or
    FEDSHIELD_FUZZ_EXAMPLES when set (docs/FUZZING.md: longer runs)."""
    import os  # noqa: PLC0415 - read at collection, once per target

    n = int(os.environ.get("FEDSHIELD_FUZZ_EXAMPLES", examples))
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture,
                                           HealthCheck.filter_too_much])


MUTATION = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10**9), st.integers(1, 255)),
    st.tuples(st.just("set"), st.integers(0, 10**9), st.integers(0, 255)),
    st.tuples(st.just("insert"), st.integers(0, 10**9), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("delete"), st.integers(0, 10**9), st.integers(1, 16)),
    st.tuples(st.just("truncate"), st.integers(0, 10**9), st.just(0)),
)
MUTATIONS = st.lists(MUTATION, min_size=1, max_size=4)


def random_mutations(rng: random.Random, count: int = 4, in_place: bool = False) -> list[tuple]:
    """The same kinds of edits as MUTATION, from a seeded random source (child processes);
    ``in_place``: byte flips and overwrites only (the size stays)."""
    kinds = ["flip", "set"] if in_place else ["flip", "flip", "set", "set", "insert",
                                              "delete", "truncate"]
    ops = []
    for _ in range(rng.randint(1, count)):
        kind = rng.choice(kinds)
        pos = rng.randrange(10**9)
        arg = {"flip": lambda: rng.randint(1, 255), "set": lambda: rng.randint(0, 255),
               "insert": lambda: rng.randbytes(rng.randint(1, 16)),
               "delete": lambda: rng.randint(1, 16), "truncate": lambda: 0}[kind]()
        ops.append((kind, pos, arg))
    return ops


def _focus(pos: int, n: int, head: int) -> int:
    """Maps a raw integer to a position, half of them in the first ``head`` bytes (where
    parsers branch)."""
    if n == 0:
        return 0
    if pos % 2 == 0:
        return (pos // 2) % min(n, head)
    return (pos // 2) % n


def mutate(data: bytes, ops, head: int = 232) -> bytes:
    buf = bytearray(data)
    for kind, pos, arg in ops:
        at = _focus(pos, len(buf), head)
        if kind == "flip" and buf:
            buf[at] ^= arg
        elif kind == "set" and buf:
            buf[at] = arg
        elif kind == "insert":
            buf[at:at] = arg
        elif kind == "delete":
            del buf[at:at + arg]
        elif kind == "truncate":
            del buf[at:]
    return bytes(buf)


def reseal_update(data: bytes | bytearray) -> bytes:
    """An update with its trailing checksum64 recomputed."""
    if len(data) < 8:
        return bytes(data)
    body = bytes(data[:-8])
    return body + struct.pack("<Q", native.checksum64(body))


def reseal_sha256(data: bytes | bytearray) -> bytes:
    """A context file with its trailing SHA-256 recomputed."""
    if len(data) < 32:
        return bytes(data)
    body = bytes(data[:-32])
    return body + hashlib.sha256(body).digest()


def seal_frame(body: bytes | bytearray) -> bytes:
    """A frame's body with its trailer: the checksum64 when its version field says so
    (fedshield.he.frames.CHECKSUMMED), else a SHA-256 (frames written before)."""
    body = bytes(body)
    if len(body) >= 10 and struct.unpack_from("<H", body, 8)[0] & CHECKSUMMED:
        return body + struct.pack("<Q", native.checksum64(body))
    return body + hashlib.sha256(body).digest()


def reseal_frame(data: bytes | bytearray) -> bytes:
    """A frame (of either trailer) with its trailer recomputed."""
    if len(data) < 10:
        return bytes(data)
    checksummed = struct.unpack_from("<H", data, 8)[0] & CHECKSUMMED
    trailer = 8 if checksummed else 32
    return bytes(data) if len(data) < trailer else seal_frame(data[:-trailer])


def split_context(blob: bytes) -> tuple[dict, list[bytes]]:
    """(head, sections) of context bytes (fedshield.he.context's format)."""
    head_len = struct.unpack_from("<I", blob, 10)[0]
    meta = json.loads(blob[14:14 + head_len])
    at, sections = 14 + head_len, []
    for _, size in meta["sections"]:
        sections.append(blob[at:at + size])
        at += size
    return meta, sections


def build_context(meta: dict, sections: list[bytes], version: int = CONTEXT_VERSION,
                  raw_head: bytes | None = None) -> bytes:
    """Context bytes from a head and sections, with a valid digest (a forgery)."""
    head = raw_head if raw_head is not None else json.dumps(meta, sort_keys=True).encode()
    body = b"FSHLDCTX" + struct.pack("<HI", version, len(head)) + head + b"".join(sections)
    return body + hashlib.sha256(body).digest()
