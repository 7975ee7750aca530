"""Server-side aggregation: native, streaming, no secret key, no openfhe, no torch."""

from __future__ import annotations

import logging
from typing import Callable, Iterable, Mapping, Union

from .. import native
from ..base.errors import FedShieldError, ParameterError
from .context import Context
from .layout import Layout
from .update import PACKING_CODE, EncryptedUpdate

log = logging.getLogger("fedshield")

UpdateLike = Union[EncryptedUpdate, bytes, bytearray, memoryview]


def aggregate(server_ctx: Context, updates: Iterable[UpdateLike], *, round: int | None = None,
              layout: Layout | None = None, mask: Mapping | None = None,
              mask_fingerprint: bytes | None = None, weight_bound: float | None = None,
              allow_partial_aggregates: bool = False, threads: int = 0,
              on_reject: Callable[[int, FedShieldError], None] | None = None) -> EncryptedUpdate:
    """Adds encrypted updates slot-wise without decrypting them.

    ``updates`` is consumed lazily, one at a time (a generator reading from disk keeps memory
    flat in the number of clients). Every update is validated before it touches the sum. By
    default the first bad update raises; with ``on_reject`` it is reported there and skipped.

    What the server knows of the round, it should say: ``round``, ``layout`` (then the mask:
    ``mask``, or its ``mask_fingerprint`` for a server that never sees the mask itself; neither
    means dense) and ``weight_bound``. Unstated, the first accepted update fixes them, and a
    hostile first reply can then get the honest ones rejected. Updates that are themselves
    aggregates are refused unless ``allow_partial_aggregates``.
    """
    if not isinstance(server_ctx, Context):
        raise TypeError(f"expected a fedshield Context, got {type(server_ctx).__name__}")
    if mask is not None and mask_fingerprint is not None:
        raise ParameterError("aggregate: pass mask= or mask_fingerprint=, not both")
    expect = {}
    if round is not None:
        expect["round"] = round
    if layout is not None:
        expect["layout_fp"] = layout.fingerprint
        expect["mask_fp"] = (mask_fingerprint if mask_fingerprint is not None
                             else layout.mask_fingerprint(mask))
    elif mask is not None or mask_fingerprint is not None:
        raise ParameterError("aggregate(mask=...) needs layout= to fingerprint the mask")
    if weight_bound is not None:
        expect["weight_bound"] = float(weight_bound)
    agg = native.Aggregator(server_ctx.fingerprint, list(server_ctx.moduli),
                             server_ctx.params.ring_dim, server_ctx.params.max_clients, threads,
                             packing=PACKING_CODE[server_ctx.params.packing],
                             elements=1 if server_ctx.params.seeded else 2,
                             allow_aggregates=allow_partial_aggregates, **expect)
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
