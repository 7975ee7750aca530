"""fedshield's messages in Flower records: their fields and their byte strings.

The fields of a fedshield.fl.protocol message travel as one ``ConfigRecord`` named ``FIELDS``.

A byte string (update, aggregate, partial decryption, sealed adapter, key set-up message)
travels as a payload: an ``ArrayRecord`` of uint8 ``Array`` chunks whose ``stype`` is a
fedshield one, plus a ``ConfigRecord`` with its size, chunk count and SHA-256. A stock strategy
calls ``Array.numpy()``, which refuses a foreign ``stype``: it cannot average ciphertext bytes
by mistake. Chunks keep every ``Array`` far below gRPC's 2 GB ceiling whatever the update size
(Flower further slices each Array into 5 MiB objects on the wire).
"""

from __future__ import annotations

import hashlib
import logging

from flwr.common import Array, ArrayRecord, ConfigRecord, RecordDict

from ...base.errors import InvalidUpdate
from ...fl.messages import InvalidMessage

FIELDS = "fedshield.fields"                  # the message's fields (a ConfigRecord)
BLOB = "fedshield.blob"                      # the i-th of a message's byte strings

STYPE_UPDATE = "fedshield.update.v1"          # the stypes of fedshield payloads
STYPE_BLOB = "fedshield.blob.v1"              # a message's byte strings (put_blobs)
STYPES = (STYPE_UPDATE, STYPE_BLOB)
MAX_BLOBS = 1 << 14                           # byte strings one message may carry

CHUNK_BYTES = 64 << 20
MAX_PAYLOAD_BYTES = (1 << 40)                 # 1 TiB: a sanity bound on the declared size


def message_fields(msg) -> dict:
    """The fields of a fedshield message (plain Python values); InvalidMessage if absent."""
    record = msg.content.config_records.get(FIELDS)
    if record is None:
        raise InvalidMessage(f"the message carries no {FIELDS!r} record")
    return {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in record.items()}


def _meta_key(name: str) -> str:
    return f"{name}.meta"


def put_payload(content: RecordDict, name: str, blob: bytes, stype: str, *,
                chunk_bytes: int = CHUNK_BYTES) -> None:
    """Stores ``blob`` under ``name`` in ``content`` (chunked, checksummed)."""
    if stype not in STYPES:
        raise ValueError(f"stype {stype!r} is not one of {STYPES}")
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes={chunk_bytes} must be positive")
    blob = bytes(blob)
    view = memoryview(blob)
    arrays = {}
    for i, start in enumerate(range(0, max(len(blob), 1), chunk_bytes)):
        part = bytes(view[start:start + chunk_bytes])
        arrays[f"{i:06d}"] = Array(dtype="uint8", shape=(len(part),), stype=stype, data=part)
    content[name] = ArrayRecord(arrays)
    content[_meta_key(name)] = ConfigRecord({
        "stype": stype, "nbytes": len(blob), "chunks": len(arrays),
        "sha256": hashlib.sha256(blob).hexdigest()})


def get_payload(content: RecordDict, name: str, stype: str) -> bytes:
    """The payload stored by :func:`put_payload`; InvalidUpdate when it is missing, has a
    foreign stype, lost or reordered chunks, or does not match its checksum."""
    if name not in content.array_records or _meta_key(name) not in content.config_records:
        raise InvalidUpdate(f"reply carries no {name!r} payload (records: {sorted(content)})")
    record = content.array_records[name]
    meta = content.config_records[_meta_key(name)]
    nbytes, chunks, digest = meta.get("nbytes"), meta.get("chunks"), meta.get("sha256")
    if meta.get("stype") != stype:
        raise InvalidUpdate(f"{name!r} payload has stype {meta.get('stype')!r}, expected {stype!r}")
    # Every count is bounded by what actually arrived before anything is allocated for it: a
    # declared chunks=10**7 cost 9.5 s and 1.25 GB before its rejection, 2**62 never finished.
    if not (_is_int(nbytes) and 0 <= nbytes <= MAX_PAYLOAD_BYTES and _is_int(chunks) and
            1 <= chunks <= max(1, nbytes) and isinstance(digest, str)):
        raise InvalidUpdate(f"{name!r} payload has malformed metadata (nbytes={nbytes!r}, "
                            f"chunks={chunks!r}; expected 0 <= nbytes <= {MAX_PAYLOAD_BYTES} "
                            "and 1 <= chunks <= max(1, nbytes))")
    if len(record) != chunks:
        raise InvalidUpdate(f"{name!r} payload holds {len(record)} chunks, its metadata says "
                            f"{chunks}")
    parts, total = [], 0
    for i in range(chunks):  # == len(record): bounded by the arrays that arrived
        key = f"{i:06d}"
        arr = record.get(key)
        if arr is None:
            raise InvalidUpdate(f"{name!r} payload lacks chunk {key} (expected {chunks} "
                                f"numbered 0..{chunks - 1})")
        if arr.stype != stype or arr.dtype != "uint8" or tuple(arr.shape) != (len(arr.data),):
            raise InvalidUpdate(f"{name!r} chunk {key} is not a uint8 {stype!r} array "
                                f"(stype={arr.stype!r}, dtype={arr.dtype!r})")
        total += len(arr.data)
        if total > nbytes:
            raise InvalidUpdate(f"{name!r} payload has more than the {nbytes} bytes its "
                                "metadata says")
        parts.append(arr.data)
    if total != nbytes:
        raise InvalidUpdate(f"{name!r} payload has {total} bytes, its metadata says {nbytes}")
    blob = b"".join(parts)
    if hashlib.sha256(blob).hexdigest() != digest:
        raise InvalidUpdate(f"{name!r} payload does not match its SHA-256 (corrupted in transit?)")
    return blob


def put_blobs(content: RecordDict, blobs, *, chunk_bytes: int = CHUNK_BYTES,
              cache: dict | None = None) -> int:
    """Stores byte strings as payloads ``BLOB.0``, ``BLOB.1``, ...; returns how many (the
    receiver's count, sent in the fields). ``cache``: chunks already made for the same bytes
    object (one chunking of an aggregate however many messages carry it)."""
    blobs = list(blobs)
    if len(blobs) > MAX_BLOBS:
        raise ValueError(f"{len(blobs)} byte strings in one message, at most {MAX_BLOBS}")
    for i, blob in enumerate(blobs):
        name = f"{BLOB}.{i}"
        made = None if cache is None else cache.get(id(blob))
        if made is None:
            one = RecordDict()
            put_payload(one, "p", blob, STYPE_BLOB, chunk_bytes=chunk_bytes)
            made = (one.array_records["p"], one.config_records[_meta_key("p")], blob)
            if cache is not None:
                cache[id(blob)] = made    # (the blob is kept: its id stays its own)
        content[name], content[_meta_key(name)] = made[0], made[1]
    return len(blobs)


def get_blobs(content: RecordDict, count) -> list[bytes]:
    """The ``count`` byte strings of :func:`put_blobs`; InvalidUpdate for a bad count or a
    missing or corrupted one."""
    if not (_is_int(count) and 0 <= count <= MAX_BLOBS):
        raise InvalidUpdate(f"blob count {count!r} is not in [0, {MAX_BLOBS}]")
    return [get_payload(content, f"{BLOB}.{i}", STYPE_BLOB) for i in range(count)]


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def payload_nbytes(content: RecordDict, name: str) -> int:
    """Declared size of a payload (0 when absent); for metrics, not validation."""
    meta = content.config_records.get(_meta_key(name))
    value = meta.get("nbytes") if meta is not None else None
    return value if isinstance(value, int) else 0


def route_logs_to_flower() -> None:
    """Sends the fedshield logger's records through Flower's handlers, so exclusions and
    round summaries reach the SuperLink/SuperNode logs and `flwr run --stream`."""
    ours, flwr_log = logging.getLogger("fedshield"), logging.getLogger("flwr")
    if ours.handlers or not flwr_log.handlers:
        return
    for handler in flwr_log.handlers:
        ours.addHandler(handler)
    ours.setLevel(logging.INFO)
    ours.propagate = False
