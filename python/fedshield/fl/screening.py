"""Screening: every check of a round's replies short of the native arithmetic, as pure steps.

Each encrypted update is parsed once (its header, natively, every byte validated) and hashed
once (SHA-256); the :class:`ScreenedUpdate` carries both to what comes next (the majority on
layout and mask, the signature check, the replay set, the manifest), so nothing parses or
hashes the same bytes again. A share is screened against its signed record and the aggregate
(:func:`screen_share`). The steps change nothing: they return what they accept and why they
refuse each other reply, and the Server records that.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from dataclasses import dataclass
from typing import Collection, Iterable, Mapping

from ..base.errors import FedShieldError
from ..he import Context, EncryptedUpdate, PartialDecryption
from ..trust.guard import SHARE_DOMAIN, UPDATE_DOMAIN
from ..trust.identity import PublicIdentity, verify_blob, verify_record
from .messages import RoundPlan, TrainReply


@dataclass(frozen=True)
class ScreenedUpdate:
    """A reply that passed the screen, with its update parsed and hashed (both None in a
    plaintext round)."""

    node: int
    reply: TrainReply
    update: EncryptedUpdate | None = None
    digest: bytes | None = None                # SHA-256 of the update's bytes

    def __iter__(self):
        """Unpacks as (node, reply), the pairs screen_updates has always returned."""
        return iter((self.node, self.reply))


@dataclass(frozen=True)
class Screening:
    """What the screen accepts, and each (node, reason) it refuses, in the order found."""

    accepted: list[ScreenedUpdate]
    excluded: list[tuple[int, str]]


def screen(plan: RoundPlan, replies: Iterable[tuple[int, TrainReply | BaseException]], *,
           participants: Mapping[int, int], roster: Mapping[int, PublicIdentity],
           ctx: Context | None, seen: Collection[bytes]) -> Screening:
    """Screens one round's replies. A reply may be an exception: the node answered, but with
    an error or a message the transport could not read (its text is the reason).
    ``participants``: node -> party; ``roster``: party -> identity (HE); ``ctx``: the public
    context (None: a plaintext round); ``seen``: digests of every update aggregated before.
    A participant that did not reply is refused too (it misses this round's aggregate)."""
    candidates: list[ScreenedUpdate] = []
    excluded: list[tuple[int, str]] = []
    answered: set[int] = set()
    digests: set[bytes] = set()
    for node, reply in replies:
        if node not in participants:
            excluded.append((node, "not an enrolled participant (joined late?)"))
            continue
        if node in answered:
            excluded.append((node, "second reply in one round"))
            continue
        answered.add(node)
        if isinstance(reply, BaseException):
            excluded.append((node, str(reply)))
            continue
        screened = _screen_one(plan, node, reply, participants[node], roster, ctx,
                               seen, digests)
        if isinstance(screened, str):
            excluded.append((node, screened))
            continue
        candidates.append(screened)
        if screened.digest is not None:
            digests.add(screened.digest)
    for node in sorted(set(participants) - answered):
        excluded.append((node, "no reply before the timeout"))
    if ctx is None:
        return Screening(candidates, excluded)
    accepted, outvoted = _majority(candidates)
    return Screening(accepted, excluded + outvoted)


def _screen_one(plan: RoundPlan, node: int, reply: TrainReply, party: int,
                roster: Mapping[int, PublicIdentity], ctx: Context | None,
                seen: Collection[bytes], digests: Collection[bytes]) -> ScreenedUpdate | str:
    """One reply, screened; or why it cannot be used."""
    if reply.party != party:
        return f"claims party {reply.party}, enrolled as {party}"
    if ctx is None:
        if reply.values is None or reply.weight is None:
            return "a plaintext round needs the update values and the weight"
        if not (math.isfinite(reply.weight) and 0 < reply.weight <= plan.weight_bound):
            return f"weight {reply.weight!r} is not in (0, {plan.weight_bound:g}]"
        return ScreenedUpdate(node, reply)
    if reply.update is None:
        return "invalid reply: no encrypted update"
    try:
        upd = EncryptedUpdate.from_bytes(reply.update)      # the one parse
    except FedShieldError as exc:
        return f"invalid reply: {exc}"
    digest = hashlib.sha256(upd.to_bytes()).digest()        # the one hash
    if upd.round != plan.round:
        return f"update of round {upd.round} in round {plan.round} (a replay or a stale client)"
    if digest in seen:
        return "replays an update already aggregated"
    if digest in digests:
        return "the same update bytes as another reply of this round"
    if upd.is_aggregate or upd.n_summed != 1:
        return "sent an aggregate, not a client update"
    if upd.context_fingerprint != ctx.fingerprint:
        return "update made under another context"
    if upd.header["weight_bound"] != plan.weight_bound:
        return (f"weight bound {upd.header['weight_bound']:g} is not the round's "
                f"{plan.weight_bound:g}")
    try:
        signed = verify_record(roster[party], UPDATE_DOMAIN, reply.signature or b"",
                               party_id=party, round=plan.round)
    except FedShieldError as exc:
        return f"unauthenticated update: {exc}"
    if signed != digest:
        return (f"unauthenticated update: {UPDATE_DOMAIN!r} blob of party {party}, round "
                f"{plan.round}: its SHA-256 digest differs from the signed one (the blob was "
                "edited or is another message)")
    return ScreenedUpdate(node, reply, upd, digest)


def _majority(candidates: list[ScreenedUpdate]
              ) -> tuple[list[ScreenedUpdate], list[tuple[int, str]]]:
    """Honest parties of one round agree on layout and mask; the server cannot compute the
    mask (it never sees the global state), so the majority sets them."""
    def key(s: ScreenedUpdate) -> tuple[bytes, bytes]:
        return s.update.layout_fingerprint, s.update.mask_fingerprint

    groups = Counter(key(s) for s in candidates)
    if not groups:
        return [], []
    (winner, count), *rest = groups.most_common()
    if rest and rest[0][1] == count:
        return [], [(s.node, "no majority on layout/mask among the replies") for s in candidates]
    return ([s for s in candidates if key(s) == winner],
            [(s.node, "layout or mask differs from the majority") for s in candidates
             if key(s) != winner])


def screen_share(answer, party: int, identity: PublicIdentity, ctx: Context,
                 agg: EncryptedUpdate, present: list[int]) -> str | None:
    """Why one party's answer to a share request cannot be used (None: it can). ``answer``:
    (share bytes, signed record), or the exception the party answered with."""
    if isinstance(answer, BaseException):
        return str(answer)
    if not (isinstance(answer, tuple) and len(answer) == 2):
        return "malformed share reply (a share and its signed record expected)"
    blob, record = answer
    try:
        verify_blob(identity, SHARE_DOMAIN, record, blob, party_id=party, round=agg.round)
        share = PartialDecryption.from_bytes(blob)
        if share.party_id != party:
            return f"share of party {share.party_id}"
        if share.present != present:
            return f"share made for present={share.present}"
        share.check_for(ctx, agg)  # context, aggregate, residues below q (native)
    except FedShieldError as exc:
        return str(exc)
    return None
