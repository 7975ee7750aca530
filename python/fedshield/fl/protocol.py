"""The round protocol: every request the server sends a site during the rounds, and its reply.

Each is a frozen dataclass with one flat wire form, ``to_wire() -> (fields, blobs)`` and
``from_wire(fields, blobs)``: scalar fields any transport can carry, and opaque byte strings
(an update, an aggregate, a partial decryption, a sealed adapter). The local engine hands the
objects over as they are; the Flower engine and the site worker's socket carry the wire form.
``from_wire`` validates everything that came from elsewhere and raises InvalidMessage (a
fs.FedShieldError) naming the bad field or count.

One round, shared keys, is ONE message step: a :class:`TrainRequest` carries the previous
round's aggregate (``apply``) and this round's plan; the site decrypts and applies the
aggregate, evaluates it, trains, encrypts and returns a :class:`TrainResult` with both. The
first train request after a key set-up also carries its last step (``commit``, a
:class:`KeyCommit`): the site writes its new key and takes it before anything else, and says so
in its reply (``committed``); a party that did not answer it gets the commit again with its
next request. With
threshold keys a :class:`ShareRequest` comes first (the partial decryptions the train request
then carries). A party that missed an aggregate takes the current adapter with its next train
request (``catch_up``), sealed to it by a party that holds it (:class:`CatchUpRequest`). The
run's last aggregate goes out in a train request without a plan (apply and evaluate only).

The key set-up's messages (fedshield.fl.key_setup) travel as :class:`RelayedRequest`: the
transport carries their op, fields and byte strings without reading them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

from .messages import (EvalReply, InvalidMessage, RoundPlan, ShareReply, TrainReply, _get,
                       _int)

TRAIN, SHARE, CATCHUP = "train", "share", "catchup"     # the ops of the round requests
PLAN_FIELDS = ("round", "lr", "prune", "prune-ratio", "weight-bound", "base-version")
APPLY, CATCH, COMMIT = "apply.", "catchup.", "commit."  # field prefixes of a TrainRequest
EVAL = "eval."                                          # field prefix of a TrainResult's eval
TRAIN_ERROR, CAUGHT_UP = "train-error", "caught-up"     # more fields of a TrainResult
COMMITTED, COMMIT_REFUSED = "committed", "commit-refused"


def _ints(fields: Mapping, name: str) -> list[int]:
    value = _get(fields, name)
    if not (isinstance(value, (list, tuple)) and all(
            isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in value)):
        raise InvalidMessage(f"{name}={value!r:.80} is not a list of ints >= 0")
    if len(set(value)) != len(value):
        raise InvalidMessage(f"{name}={list(value)!r:.80} names a party twice")
    return list(value)


def _bytes(blobs: Sequence, what: str) -> list[bytes]:
    if not all(isinstance(b, (bytes, bytearray, memoryview)) for b in blobs):
        raise InvalidMessage(f"{what}: a byte string expected")
    return [bytes(b) for b in blobs]


def _count(blobs: Sequence, expected: int, what: str, *, at_least: bool = False) -> None:
    if len(blobs) < expected or (not at_least and len(blobs) != expected):
        raise InvalidMessage(f"{what}: {len(blobs)} byte strings, expected "
                             f"{'at least ' if at_least else ''}{expected}")


def _prefixed(prefix: str, fields: Mapping) -> dict:
    return {k[len(prefix):]: v for k, v in fields.items() if k.startswith(prefix)}


# -- the train request: the previous aggregate, the catch-up, the plan ------------------------
@dataclass(frozen=True)
class Aggregate:
    """A round's result for every site to apply: the aggregate (and, threshold keys, the
    parties' partial decryptions with their signed records), its provenance, or without HE
    the plaintext average (local engine only: it has no wire form)."""

    plan: RoundPlan                                  # the round it is the result of
    blob: bytes | None = None                        # the aggregate EncryptedUpdate
    shares: tuple[tuple[int, bytes, bytes], ...] = ()   # (party, share, signed record)
    provenance: tuple[bytes, ...] = ()               # Provenance.to_blobs()
    average: Mapping | None = None                   # plaintext baseline
    save_adapter: bool = False                       # this site writes the run's adapter


@dataclass(frozen=True)
class CatchUp:
    """The global adapter of round ``version``, sealed to this party by ``source``."""

    version: int
    source: int
    sealed: bytes


@dataclass(frozen=True)
class KeyCommit:
    """The key set-up's last step (fedshield.fl.key_setup): write and use the key of epoch
    ``epoch``, whose public context has fingerprint ``context_fp`` (hex)."""

    epoch: int
    context_fp: str

    def __post_init__(self) -> None:
        fp = self.context_fp
        if not (isinstance(fp, str) and 0 < len(fp) <= 128
                and all(c in "0123456789abcdef" for c in fp)):
            raise InvalidMessage(f"{COMMIT}context-fp={fp!r:.80} is not a hex fingerprint")


@dataclass(frozen=True)
class TrainRequest:
    """Commit the key set-up's keys (``commit``), apply ``apply`` (after taking ``catch_up``),
    evaluate it, then train round ``plan`` (None: apply and evaluate only, the run's last
    aggregate)."""

    plan: RoundPlan | None
    apply: Aggregate | None = None
    catch_up: CatchUp | None = None
    commit: KeyCommit | None = None
    op = TRAIN

    def __post_init__(self) -> None:
        if self.plan is None and self.apply is None:
            raise InvalidMessage("a train request with neither a plan nor an aggregate")

    def to_wire(self) -> tuple[dict, list[bytes]]:
        fields, blobs = dict(self.plan.to_fields()) if self.plan else {}, []
        if self.commit is not None:
            fields.update({COMMIT + "epoch": self.commit.epoch,
                           COMMIT + "context-fp": self.commit.context_fp})
        if self.catch_up is not None:
            fields.update({CATCH + "version": self.catch_up.version,
                           CATCH + "from": self.catch_up.source})
            blobs.append(self.catch_up.sealed)
        a = self.apply
        if a is not None:
            if a.blob is None:
                raise InvalidMessage("a plaintext average has no wire form (local engine only)")
            fields.update({APPLY + k: v for k, v in a.plan.to_fields().items()})
            fields[APPLY + "shares"] = [p for p, _, _ in a.shares]
            fields[APPLY + "save-adapter"] = a.save_adapter
            blobs += [a.blob, *(s for _, s, _ in a.shares), *(r for _, _, r in a.shares),
                      *a.provenance]
        return fields, blobs

    @classmethod
    def from_wire(cls, fields: Mapping, blobs: Sequence) -> "TrainRequest":
        known = {*PLAN_FIELDS, *(APPLY + k for k in PLAN_FIELDS), APPLY + "shares",
                 APPLY + "save-adapter", CATCH + "version", CATCH + "from", COMMIT + "epoch",
                 COMMIT + "context-fp"}
        unknown = sorted(str(k)[:64] for k in fields if k not in known)
        if unknown:
            raise InvalidMessage(f"train: unknown fields {unknown}")
        blobs = _bytes(blobs, "train")
        plan = (RoundPlan.from_fields(fields) if any(k in fields for k in PLAN_FIELDS)
                else None)
        commit = None
        if COMMIT + "epoch" in fields or COMMIT + "context-fp" in fields:
            commit = KeyCommit(epoch=_int(fields, COMMIT + "epoch", 1),
                               context_fp=_get(fields, COMMIT + "context-fp"))
        catch_up = None
        if CATCH + "version" in fields or CATCH + "from" in fields:
            _count(blobs, 1, "train: the sealed adapter of a catch-up", at_least=True)
            catch_up = CatchUp(version=_int(fields, CATCH + "version"),
                               source=_int(fields, CATCH + "from"), sealed=blobs.pop(0))
        apply = None
        if any(k.startswith(APPLY) for k in fields):
            parties = _ints(fields, APPLY + "shares")
            n = len(parties)
            _count(blobs, 1 + 2 * n, f"train: an aggregate with {n} shares", at_least=True)
            save = _get(fields, APPLY + "save-adapter")
            if not isinstance(save, bool):
                raise InvalidMessage(f"{APPLY}save-adapter={save!r:.40} is not a bool")
            apply = Aggregate(plan=RoundPlan.from_fields(_prefixed(APPLY, fields)),
                              blob=blobs[0],
                              shares=tuple(zip(parties, blobs[1:1 + n],
                                               blobs[1 + n:1 + 2 * n])),
                              provenance=tuple(blobs[1 + 2 * n:]), save_adapter=save)
        elif blobs:
            raise InvalidMessage(f"train: {len(blobs)} byte strings with no aggregate")
        return cls(plan=plan, apply=apply, catch_up=catch_up, commit=commit)

    @staticmethod
    def reply_from_wire(fields: Mapping, blobs: Sequence) -> "TrainResult":
        return TrainResult.from_wire(fields, blobs)


@dataclass(frozen=True)
class TrainResult:
    """A site's answer to a TrainRequest: its evaluation of the aggregate it applied, and its
    update for the round, or why it could not train after applying or committing
    (``train_error``: the error's type and fixed message). With a commit: the fingerprint of
    the key it committed, or why it refused to (``commit_refused``; then nothing else)."""

    evaluation: EvalReply | None = None
    update: TrainReply | None = None
    train_error: str | None = None
    caught_up: str | None = None      # fingerprint of the adapter a catch-up brought
    committed: str | None = None      # fingerprint of the key context it committed
    commit_refused: str | None = None

    def to_wire(self, keep=lambda fields: fields) -> tuple[dict, list[bytes]]:
        """``keep``: what of a part's fields may leave (the site's metrics policy)."""
        fields, blobs = {}, []
        if self.update is not None:
            fields.update(keep(self.update.to_fields()))
            if self.update.update is not None:
                blobs = [self.update.update, self.update.signature or b""]
        if self.evaluation is not None:
            fields.update({EVAL + k: v for k, v in keep(self.evaluation.to_fields()).items()})
        if self.train_error is not None:
            fields[TRAIN_ERROR] = self.train_error
        for name, value in ((CAUGHT_UP, self.caught_up), (COMMITTED, self.committed),
                            (COMMIT_REFUSED, self.commit_refused)):
            if value is not None:
                fields[name] = value
        return fields, blobs

    @classmethod
    def from_wire(cls, fields: Mapping, blobs: Sequence) -> "TrainResult":
        blobs = _bytes(blobs, "train reply")
        texts = (TRAIN_ERROR, CAUGHT_UP, COMMITTED, COMMIT_REFUSED)
        own = {k: v for k, v in fields.items() if not k.startswith(EVAL) and k not in texts}
        evaluation = (EvalReply.from_fields(_prefixed(EVAL, fields))
                      if any(k.startswith(EVAL) for k in fields) else None)
        for name in texts:
            value = fields.get(name)
            if value is not None and not isinstance(value, str):
                raise InvalidMessage(f"{name}={value!r:.40} is not a string")
        update = None
        if own:
            _count(blobs, 2, "train reply: the update and its signed record")
            update = TrainReply.from_fields(own, blobs[0], signature=blobs[1])
        elif blobs:
            raise InvalidMessage(f"train reply: {len(blobs)} byte strings with no update")
        return cls(evaluation=evaluation, update=update, train_error=fields.get(TRAIN_ERROR),
                   caught_up=fields.get(CAUGHT_UP), committed=fields.get(COMMITTED),
                   commit_refused=fields.get(COMMIT_REFUSED))


# -- threshold keys: the partial decryptions ---------------------------------------------------
@dataclass(frozen=True)
class ShareRequest:
    """Threshold keys: this party's partial decryption of round ``round``'s aggregate, made
    for the parties ``present``, once its guard admits the aggregate (``provenance``)."""

    round: int
    present: tuple[int, ...]
    aggregate: bytes
    provenance: tuple[bytes, ...] = ()
    op = SHARE

    def to_wire(self) -> tuple[dict, list[bytes]]:
        return ({"round": self.round, "present": list(self.present)},
                [self.aggregate, *self.provenance])

    @classmethod
    def from_wire(cls, fields: Mapping, blobs: Sequence) -> "ShareRequest":
        unknown = sorted(str(k)[:64] for k in fields if k not in ("round", "present"))
        if unknown:
            raise InvalidMessage(f"share: unknown fields {unknown}")
        blobs = _bytes(blobs, "share")
        _count(blobs, 1, "share: the aggregate", at_least=True)
        return cls(round=_int(fields, "round", 1), present=tuple(_ints(fields, "present")),
                   aggregate=blobs[0], provenance=tuple(blobs[1:]))

    @staticmethod
    def reply_from_wire(fields: Mapping, blobs: Sequence) -> ShareReply:
        blobs = _bytes(blobs, "share reply")
        _count(blobs, 2, "share reply: the share and its signed record")
        return ShareReply.from_fields(fields, blobs[0], signature=blobs[1])


def share_to_wire(reply: ShareReply) -> tuple[dict, list[bytes]]:
    return reply.to_fields(), [reply.share, reply.signature]


# -- catch-up: a party that holds the current adapter seals it to those behind -----------------
@dataclass(frozen=True)
class CatchUpRequest:
    """Seal this party's global adapter of round ``version`` to each party of ``to``."""

    version: int
    to: tuple[int, ...]
    op = CATCHUP

    def to_wire(self) -> tuple[dict, list[bytes]]:
        return {"version": self.version, "to": list(self.to)}, []

    @classmethod
    def from_wire(cls, fields: Mapping, blobs: Sequence) -> "CatchUpRequest":
        unknown = sorted(str(k)[:64] for k in fields if k not in ("version", "to"))
        if unknown or blobs:
            raise InvalidMessage(f"catchup: unknown fields {unknown} or byte strings")
        return cls(version=_int(fields, "version"), to=tuple(_ints(fields, "to")))

    def reply_from_wire(self, fields: Mapping, blobs: Sequence) -> "CatchUpReply":
        blobs = _bytes(blobs, "catchup reply")
        _count(blobs, len(self.to), f"catchup reply: one sealed adapter for each of {self.to}")
        return CatchUpReply(sealed=dict(zip(self.to, blobs)))


@dataclass(frozen=True)
class CatchUpReply:
    sealed: dict = field(default_factory=dict)        # recipient party -> sealed adapter

    def to_wire(self) -> tuple[dict, list[bytes]]:
        return {}, list(self.sealed.values())


# -- what the transport carries unread: the key set-up's messages -------------------------------
@dataclass(frozen=True)
class RelayedRequest:
    """A message of another protocol (the key set-up's): op, fields and byte strings that the
    transport carries as they are; its own receiver validates them."""

    op: str
    fields: dict
    blobs: tuple = ()

    def to_wire(self) -> tuple[dict, list[bytes]]:
        return dict(self.fields), list(self.blobs)

    @staticmethod
    def reply_from_wire(fields: Mapping, blobs: Sequence) -> tuple[dict, list[bytes]]:
        return dict(fields), _bytes(blobs, "relayed reply")


ROUND_REQUESTS = {TRAIN: TrainRequest, SHARE: ShareRequest, CATCHUP: CatchUpRequest}


def request_from_wire(op: str, fields: Mapping, blobs: Sequence):
    """The round request ``op`` of a site's incoming message; InvalidMessage if unknown."""
    kind = ROUND_REQUESTS.get(op)
    if kind is None:
        raise InvalidMessage(f"unknown round request {op!r:.40}; expected one of "
                             f"{sorted(ROUND_REQUESTS)}")
    return kind.from_wire(fields, blobs)


def reply_to_wire(reply, keep=lambda fields: fields) -> tuple[dict, list[bytes]]:
    """A site's typed reply in its wire form (``keep``: the site's metrics policy)."""
    if isinstance(reply, TrainResult):
        return reply.to_wire(keep)
    if isinstance(reply, ShareReply):
        fields, blobs = share_to_wire(reply)
        return keep(fields), blobs
    return reply.to_wire()
