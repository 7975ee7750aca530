"""Server-side aggregation: native, streaming, no secret key, no openfhe import."""

from __future__ import annotations

import logging
from typing import Callable, Iterable, Union

from . import _native
from .errors import FedShieldError
from .he.context import Context
from .update import EncryptedUpdate

log = logging.getLogger("fedshield")

UpdateLike = Union[EncryptedUpdate, bytes, bytearray, memoryview]


def aggregate(server_ctx: Context, updates: Iterable[UpdateLike], *, threads: int = 0,
              on_reject: Callable[[int, FedShieldError], None] | None = None) -> EncryptedUpdate:
    """Adds encrypted updates slot-wise without decrypting them.

    ``updates`` is consumed lazily, one at a time (a generator reading from disk keeps memory
    flat in the number of clients). Every update is validated before it touches the sum. By
    default the first bad update raises; with ``on_reject`` it is reported there and skipped.
    """
    if not isinstance(server_ctx, Context):
        raise TypeError(f"expected a fedshield Context, got {type(server_ctx).__name__}")
    agg = _native.Aggregator(server_ctx.fingerprint, server_ctx.modulus,
                             server_ctx.params.ring_dim, server_ctx.params.max_clients, threads)
    for index, update in enumerate(updates):
        data = update.to_bytes() if isinstance(update, EncryptedUpdate) else update
        try:
            agg.add(data)
        except FedShieldError as exc:
            if on_reject is None:
                raise
            log.warning("update %d rejected: %s", index, exc)
            on_reject(index, exc)
    if agg.count == 0:
        raise FedShieldError("aggregate: no valid update to aggregate")
    return EncryptedUpdate.from_bytes(agg.result())
