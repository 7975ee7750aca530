"""What a key holder checks before its key touches an aggregate, and what it signs.

Every update and every partial decryption travels with a signed record (fedshield.trust.identity:
party id, round and the SHA-256 of the whole message, header included, under the party's
identity key). An aggregate travels with its :class:`Provenance`: its *manifest* (the records
of the updates summed in) and the server's own record binding the aggregate's digest to that
manifest, under the server's identity key (its fingerprint is logged at every site, like the
parties').

:class:`AggregateGuard` (one per key holder) decrypts an aggregate only when

* the server's record binds this aggregate to this manifest (a relay cannot swap in another
  aggregate, e.g. one client's update relabelled as an aggregate, or another manifest);
* its manifest holds one valid record per summed update, of the aggregate's round, from at
  least ``min_parties`` distinct enrolled parties;
* it is the round's first aggregate, or the same one again (a server that got the average of
  u1+u2+u3 never gets u1+u2 decrypted in the same round: their difference would be u3);
* with ``verify``, the signed updates themselves came along and their sum, recomputed natively
  here, is the aggregate byte for byte. Without it the server itself is trusted to sum what
  its manifest lists: a malicious server could present one update under a manifest of
  several (docs/THREAT_MODEL.md);

and fuses partial decryptions only when each carries its party's valid record. Every refusal is
a fs.FedShieldError subclass (AuthenticationError, DecryptionRefused).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from ..base.errors import AuthenticationError, DecryptionRefused
from ..he import Context, EncryptedUpdate, aggregate, aggregate_digest
from .identity import (MAX_PARTY_ID, RECORD_SIZE, Identity, PublicIdentity, record_signer,
                           sign_blob, verify_blob, verify_record)
from ..he.partial import PartialDecryption

UPDATE_DOMAIN = "update"
SHARE_DOMAIN = "share"
AGGREGATE_DOMAIN = "aggregate"
SERVER_ID = MAX_PARTY_ID        # the server's "party id" in the records it signs
MAX_MANIFEST = 1 << 16


def _binding(agg: EncryptedUpdate, manifest: bytes) -> bytes:
    return bytes.fromhex(aggregate_digest(agg)) + bytes(manifest)


@dataclass(frozen=True)
class Provenance:
    """What comes with an aggregate so that a key holder may decrypt it (module docstring)."""

    manifest: bytes                            # the summed updates' signed records
    server_record: bytes                       # the server's: this aggregate, this manifest
    updates: tuple[bytes, ...] | None = None   # verify_aggregates: the updates, in manifest order

    @classmethod
    def make(cls, server: Identity, agg: EncryptedUpdate, records: Iterable[bytes],
             updates: Sequence[bytes] | None = None) -> "Provenance":
        """The server's side: the manifest of ``records`` (ordered by party; ``updates`` in
        the same order) and its own signed record binding ``agg`` to it."""
        records = [bytes(r) for r in records]
        order = sorted(range(len(records)), key=lambda i: record_signer(records[i])[0])
        manifest = b"".join(records[i] for i in order)
        record = sign_blob(server, AGGREGATE_DOMAIN, SERVER_ID, agg.round,
                           _binding(agg, manifest))
        return cls(manifest, record,
                   None if updates is None else tuple(bytes(updates[i]) for i in order))

    def to_blobs(self) -> list[bytes]:
        return [self.manifest, self.server_record, *(self.updates or ())]

    @classmethod
    def from_blobs(cls, blobs: Sequence[bytes]) -> "Provenance":
        if len(blobs) < 2:
            raise AuthenticationError("an aggregate came without its manifest and the "
                                      "server's record")
        return cls(bytes(blobs[0]), bytes(blobs[1]),
                   tuple(bytes(b) for b in blobs[2:]) or None)


def sign_update(identity: Identity, party: int, update: bytes) -> bytes:
    """The record a party sends beside its update (the round is the update's own)."""
    return sign_blob(identity, UPDATE_DOMAIN, party, EncryptedUpdate.from_bytes(update).round,
                     update)


def sign_share(identity: Identity, party: int, round: int, share: bytes) -> bytes:
    return sign_blob(identity, SHARE_DOMAIN, party, round, share)


def split_manifest(data: bytes) -> list[bytes]:
    data = bytes(data)
    if len(data) % RECORD_SIZE or not 0 < len(data) // RECORD_SIZE <= MAX_MANIFEST:
        raise AuthenticationError(f"a manifest of {len(data)} bytes is not 1..{MAX_MANIFEST} "
                                  f"records of {RECORD_SIZE}")
    return [data[i:i + RECORD_SIZE] for i in range(0, len(data), RECORD_SIZE)]


class AggregateGuard:
    """See the module docstring. ``roster``: party -> public identity (from enrolment)."""

    def __init__(self, roster: Mapping[int, PublicIdentity], server: PublicIdentity,
                 min_parties: int, *, verify: bool = False) -> None:
        if min_parties < 1:
            raise ValueError(f"min_parties={min_parties} must be >= 1")
        self.roster = dict(roster)
        self.server = server
        self.min_parties = int(min_parties)
        self.verify = bool(verify)
        self._decrypted: dict[int, str] = {}     # round -> digest of the aggregate it decrypted

    def check_aggregate(self, ctx: Context, agg: EncryptedUpdate,
                        provenance: Provenance | None) -> list[int]:
        """The parties whose updates the aggregate sums, once it may be decrypted (see the
        module docstring); raises AuthenticationError or DecryptionRefused otherwise."""
        if not agg.is_aggregate:
            raise DecryptionRefused("a key holder decrypts aggregates only, not one client's "
                                    "update")
        if provenance is None:
            raise DecryptionRefused(f"the aggregate of round {agg.round} came without the signed "
                                    "records of its updates")
        manifest = provenance.manifest
        verify_blob(self.server, AGGREGATE_DOMAIN, provenance.server_record,
                    _binding(agg, manifest), party_id=SERVER_ID, round=agg.round)
        records = split_manifest(manifest)
        if len(records) != agg.n_summed:
            raise DecryptionRefused(f"the aggregate claims {agg.n_summed} updates, its manifest "
                                    f"signs {len(records)}")
        parties, digests = [], []
        for record in records:
            party, _ = record_signer(record)
            if party not in self.roster:
                raise AuthenticationError(f"the manifest names party {party}, not enrolled")
            if party in parties:
                raise DecryptionRefused(f"the manifest names party {party} twice")
            digests.append(verify_record(self.roster[party], UPDATE_DOMAIN, record,
                                         party_id=party, round=agg.round))
            parties.append(party)
        if len(parties) < self.min_parties:
            raise DecryptionRefused(f"the aggregate of round {agg.round} sums {len(parties)} "
                                    f"parties' updates; decryption needs {self.min_parties}")
        if self.verify:
            self._recompute(ctx, agg, parties, digests, provenance.updates)
        digest = aggregate_digest(agg)
        seen = self._decrypted.get(agg.round)
        if seen is not None and seen != digest:
            raise DecryptionRefused(f"this key already decrypted another aggregate of round "
                                    f"{agg.round}; one aggregate per round")
        self._decrypted[agg.round] = digest
        return parties

    @staticmethod
    def _recompute(ctx: Context, agg: EncryptedUpdate, parties: list[int],
                   digests: list[bytes], updates: Sequence[bytes] | None) -> None:
        if updates is None or len(updates) != len(parties):
            raise DecryptionRefused("verify: the signed updates must come with the aggregate "
                                    f"({len(parties)} expected, got "
                                    f"{0 if updates is None else len(updates)})")
        for party, digest, update in zip(parties, digests, updates):
            if hashlib.sha256(update).digest() != digest:
                raise AuthenticationError(f"verify: the update sent as party {party}'s is not "
                                          "the one its record signs")
        again = aggregate(ctx.public() if ctx.has_secret_key or ctx.is_party else ctx, updates,
                          round=agg.round, weight_bound=agg.header["weight_bound"])
        if again.to_bytes() != agg.to_bytes():
            raise DecryptionRefused("verify: the aggregate is not the sum of the signed updates")

    def check_shares(self, agg: EncryptedUpdate, shares: Sequence[bytes],
                     records: Sequence[bytes]) -> None:
        """Each partial decryption is its party's, signed, for this aggregate's round."""
        if len(shares) != len(records):
            raise AuthenticationError(f"{len(shares)} partial decryptions, {len(records)} "
                                      "signed records")
        for share, record in zip(shares, records):
            party = PartialDecryption.from_bytes(share).party_id
            if party not in self.roster:
                raise AuthenticationError(f"a partial decryption names party {party}, not "
                                          "enrolled")
            verify_blob(self.roster[party], SHARE_DOMAIN, record, share, party_id=party,
                        round=agg.round)


__all__ = ["AGGREGATE_DOMAIN", "AggregateGuard", "Provenance", "SERVER_ID", "SHARE_DOMAIN",
           "UPDATE_DOMAIN", "sign_share", "sign_update", "split_manifest"]
