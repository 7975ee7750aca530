"""Threshold mode: OpenFHE multiparty CKKS, n-of-n or t-of-n, with every message as bytes.

Key generation is collective, in one parallel step (as in Lattigo's multiparty package): every
party expands the same uniform polynomial ``a`` from a public seed (:func:`keygen_seed`: the
parameters, n, t, the roster and the key epoch, expanded natively with AES-256-CTR), makes its
own key share s_i with OpenFHE (``MultipartyKeyGen`` on a key of its own template whose a is
the common one) and publishes b_i = -a * s_i + e_i (:func:`start_keygen`). The joint public key
is (sum_i b_i, a): its secret key is sum_i s_i, which nobody ever holds
(:func:`finish_keygen`). OpenFHE's sequential chain took n steps; this takes one.

A last party that saw the others' b_i could choose its own as b = -sum_others b_j - a * s' + e
and so hold the whole joint key alone (a rogue key). Every party therefore publishes a
commitment to its b_i (:func:`commitment`, SHA-256) before anyone reveals one, and every party
checks every revealed b_i against its commitment before it adds it in.

No OpenFHE bytes travel. Every party makes its crypto context itself from the federation's
parameters (its own, never a message's: :func:`fedshield.he.keys.local_crypto`), and a party's
contribution carries only the residues of b_i (docs/WIRE.md, "Key set-up messages"), which
:func:`read_contribution` checks against the reader's own parameters, seed and moduli (the
native codec checks sizes and residues) before they are summed and written into a public key
of the reader's own template. The server screens and sums contributions natively too.

t-of-n (t > n/2): each party Shamir-shares its own key share among the others
(:func:`deal_key_shares` -> one message per recipient, :func:`accept_key_shares`), in the same
step as its commitment: the shares depend on s_i only, never on the joint key. OpenFHE's
``ShareKeys`` returns objects its Python binding cannot serialize, so the sharing is done
natively (csrc/shamir.cpp) on the residues mod q of the key's BINARY serialization, with
coefficients from the kernel CSPRNG (getrandom(2)). Key-share messages are secret: send each
one to its recipient only, over a confidential, authenticated channel.

Decryption (partial decryptions and their fusion, and the key check's probes) is in
fedshield.he.partial.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Iterable, Optional, Sequence

import numpy as np

from .. import native
from ..base.errors import InvalidUpdate, KeyMaterialError, ParameterError
from . import backend
from .context import Context
from .flooding import check_precision
from .frames import DIGEST, frame, int_field, unframe
from .keys import PUBLIC, check_head, check_size, local_crypto
from .params import CKKSParams
from .wipe import wipe

KEYGEN_MAGIC = b"FSHLDKGN"    # a party's contribution b_i to the joint public key (public)
# Version 1 carried OpenFHE's serialized crypto context and public key, which the receiver
# deserialized: one edited byte crashed it. Version 2 was a step of OpenFHE's sequential chain
# (residues only). Version 3 is one party's b_i of collective key generation.
KEYGEN_VERSION = 3
_SEED_DOMAIN = b"fedshield-keygen-seed-v3"
_COMMIT_DOMAIN = b"fedshield-keygen-commit-v3"
_HEAD_LIMIT = 1 << 17         # parameters, moduli, seed
KEY_SHARE_MAGIC = b"FSHLDKSH"  # a Shamir share of one party's key share (secret)
# Version 1 named the joint context (dealt after the chain); version 2 names the key epoch's
# seed (dealt in the commitment step, before the joint key exists).
KEY_SHARE_VERSION = 2
_SHARE_FIELDS = {"sender", "recipient", "n_parties", "threshold", "seed", "sizes"}
_SHARE_HEAD_LIMIT = 1 << 10
MAX_PARTIES = 1024
SEED_BYTES = 32

# Threshold parties encrypt with the joint public key, and partial decryptions carry OpenFHE's
# fixed multiparty noise: the profile for 1e-6 sizes the scale for both (fedshield.he.partial).
THRESHOLD_PARAMS = CKKSParams.for_precision(keys="threshold")


def resolve(params: Optional[CKKSParams], n_parties) -> CKKSParams:
    """The threshold parameters of a federation of ``n_parties`` (a request resolved as every
    party resolves it: the parties' messages must name the same parameters everywhere)."""
    params = params or THRESHOLD_PARAMS
    if not isinstance(params, CKKSParams):
        raise TypeError(f"expected CKKSParams, got {type(params).__name__}")
    return params.for_keys("threshold", n_parties if isinstance(n_parties, int) else 0)


def _check_parties(n_parties, threshold) -> tuple[int, int]:
    if not (isinstance(n_parties, int) and not isinstance(n_parties, bool)
            and 2 <= n_parties <= MAX_PARTIES):
        raise ParameterError(f"n_parties={n_parties!r} must be an int in [2, {MAX_PARTIES}]")
    if threshold is None:
        threshold = n_parties
    if not (isinstance(threshold, int) and not isinstance(threshold, bool)
            and n_parties // 2 < threshold <= n_parties):
        raise ParameterError(f"threshold={threshold!r} must be an int t with "
                             f"n_parties/2 < t <= n_parties={n_parties} (or None for n-of-n)")
    return n_parties, threshold


def _check_seed(seed) -> bytes:
    if not (isinstance(seed, (bytes, bytearray)) and len(seed) == SEED_BYTES):
        raise ParameterError(f"a key generation seed is {SEED_BYTES} bytes, got {seed!r:.80}")
    return bytes(seed)


# -- the common polynomial a -------------------------------------------------------------------
def keygen_seed(params: CKKSParams, n_parties: int, threshold: int,
                roster: Sequence[bytes], epoch: int) -> bytes:
    """The public seed of a key epoch's common ``a``: SHA-256 of the parameters, n, t, the
    roster's public identities (in party order; the server's last, if the caller adds it) and
    the epoch. Every party and the server compute it from what keys.begin carries; a new epoch
    or roster gives a new a."""
    h = hashlib.sha256(_SEED_DOMAIN)
    for part in (params.to_json().encode(), f"{n_parties}/{threshold}/{epoch}".encode(),
                 *map(bytes, roster)):
        h.update(len(part).to_bytes(8, "little") + part)
    return h.digest()


def common_a(seed: bytes, ring_dim: int, moduli) -> np.ndarray:
    """``a`` of the joint public key: T towers of N residues uniform mod each tower's modulus
    (evaluation form), expanded natively from ``seed`` by AES-256-CTR (counter block: 0, the
    tower)."""
    seed = _check_seed(seed)
    return np.concatenate([native.expand_uniform(seed, 0, t, int(q), ring_dim)
                           for t, q in enumerate(moduli)])


def packed_a(seed: bytes, ring_dim: int, moduli) -> bytes:
    """:func:`common_a`, bit-packed as one polynomial (what the second half of a packed public
    key holds)."""
    a = common_a(seed, ring_dim, moduli)
    return bytes(native.pack_key_polys(a, ring_dim, [int(q) for q in moduli], 1, "common a"))


def commitment(seed: bytes, party: int, contribution) -> bytes:
    """What a party publishes before anyone reveals a b_i: SHA-256 over the seed, its id and
    its packed b_i (b_i has N * T uniform-looking residues: the digest hides it)."""
    return hashlib.sha256(_COMMIT_DOMAIN + _check_seed(seed) + int(party).to_bytes(4, "little")
                          + bytes(contribution)).digest()


# -- key generation ---------------------------------------------------------------------------
class KeygenState:
    """A party's key share between collective key generation's first step and the joint key
    (cannot encrypt yet): its own b_i (``contribution``), the commitment to it, and the Shamir
    shares of the other parties' key shares it accepted."""

    __slots__ = ("params", "party_id", "n_parties", "threshold", "seed", "contribution",
                 "_own", "_local")

    def __init__(self, params: CKKSParams, party_id: int, n_parties: int, threshold: int,
                 seed: bytes, contribution: bytes, own: Context, local) -> None:
        self.params, self.party_id = params, party_id
        self.n_parties, self.threshold, self.seed = n_parties, threshold, seed
        self.contribution = contribution
        self._own = own      # a party context on this party's own (b_i, a)
        self._local = local  # its crypto context and key templates (fedshield.he.keys)

    @property
    def moduli(self) -> tuple[int, ...]:
        """The tower moduli of the party's own crypto context."""
        return self._own.moduli

    @property
    def commitment(self) -> bytes:
        return commitment(self.seed, self.party_id, self.contribution)

    @property
    def own_context(self) -> Context:
        """A party context of this party's own key share and (b_i, a), with the Shamir shares
        accepted so far: what the key check's probes decrypt with (fedshield.he.partial)."""
        return self._own

    def __repr__(self) -> str:
        return (f"KeygenState(party={self.party_id}/{self.n_parties}, "
                f"threshold={self.threshold})")


def start_keygen(params: Optional[CKKSParams], n_parties: int, threshold: Optional[int],
                 party_id: int, seed: bytes) -> KeygenState:
    """Party ``party_id``'s key share s_i and b_i = -a * s_i + e_i under the common a of
    ``seed``, on a crypto context made here from ``params`` (a request is resolved for
    threshold keys). Publish ``state.commitment`` first, ``state.contribution`` (with
    :func:`contribution_message`) once every party's commitment is in."""
    params = resolve(params, n_parties)
    n_parties, threshold = _check_parties(n_parties, threshold)
    if not (isinstance(party_id, int) and not isinstance(party_id, bool)
            and 0 <= party_id < n_parties):
        raise ParameterError(f"party_id={party_id!r} must be an int in [0, {n_parties})")
    seed = _check_seed(seed)
    if params.seeded:
        raise ParameterError(
            "threshold parties hold key shares and encrypt with the joint public key: use "
            "unseeded parameters, e.g. fs.CKKSParams.for_precision(keys='threshold') "
            "(or seeded=False)")
    check_precision(params, n_parties)
    local = local_crypto(params)
    n, moduli = params.ring_dim, list(local.moduli)
    a = packed_a(seed, n, moduli)
    # a key of this party's own template with b = 0 and the common a: OpenFHE's multiparty key
    # generation keeps its a and makes (e_i - a * s_i, a) with a fresh s_i ("fresh": b not added)
    zero_b = bytes(native.pack_key_polys(np.zeros(n * len(moduli), dtype=np.uint64), n,
                                          moduli, 1, "zero"))
    _, template_key = local.public_key(zero_b + a, "common a")
    key_pair = local.cc.MultipartyKeyGen(template_key, False, True)
    packed = bytes(local.pack(key_pair.publicKey, PUBLIC))
    half = len(packed) // 2
    if packed[half:] != a:
        raise KeyMaterialError("OpenFHE's multiparty key generation did not keep the common a")
    own = local.context(backend.serialize_key(key_pair.publicKey), key_pair.publicKey,
                        role="party", secret_key=backend.serialize_key(key_pair.secretKey),
                        party=(party_id, n_parties, threshold),
                        live={"secret_key": key_pair.secretKey})
    return KeygenState(params, party_id, n_parties, threshold, seed, packed[:half], own, local)


def contribution_message(state: KeygenState) -> bytes:
    """A party's b_i on the wire (public; sign it): its residues and what they are for."""
    p = state.params
    meta = {"params": json.loads(p.to_json()), "n_parties": state.n_parties,
            "threshold": state.threshold, "party": state.party_id, "ring_dim": p.ring_dim,
            "moduli": [int(q) for q in state.moduli], "seed": state.seed.hex()}
    return frame(KEYGEN_MAGIC, meta, [state.contribution], version=KEYGEN_VERSION)


class Contribution:
    """A parsed contribution (:func:`read_contribution`): its sender, the tower moduli it
    claims and the packed residues of its b_i."""

    __slots__ = ("sender", "moduli", "packed")

    def __init__(self, sender: int, moduli: tuple, packed: bytes) -> None:
        self.sender, self.moduli, self.packed = sender, moduli, packed


def read_contribution(message, params: CKKSParams, n_parties: int, threshold: int,
                      seed: bytes, moduli=None) -> Contribution:
    """A party's contribution checked against the reader's own federation (``params``, n, t,
    the epoch's ``seed``; and its own tower ``moduli`` when it has a crypto context): exact
    head, exact sizes, every residue below its modulus (native). No openfhe: the server screens
    every contribution with it too. KeyMaterialError for anything else."""
    what = "key generation contribution"
    n, towers = params.ring_dim, params.n_towers
    # an upper bound from the parameters alone (q < 2**62): checked before anything is read
    check_size(message, len(KEYGEN_MAGIC) + 6 + _HEAD_LIMIT + towers * n * 8 + DIGEST, what)
    meta, sections = unframe(message, KEYGEN_MAGIC, what, KeyMaterialError,
                             version=KEYGEN_VERSION)
    claimed = meta.get("moduli")
    if not (isinstance(claimed, list) and len(claimed) == towers and
            all(isinstance(q, int) and not isinstance(q, bool) for q in claimed)):
        raise KeyMaterialError(f"malformed {what}: moduli={claimed!r:.200} are not "
                               f"{towers} ints")
    if moduli is not None and claimed != [int(q) for q in moduli]:
        raise KeyMaterialError(f"{what} made for the tower moduli {claimed}, this party's "
                               f"context has {list(moduli)}")
    size = packed_size(n, claimed, what)
    check_head(meta, {"params": json.loads(params.to_json()), "n_parties": n_parties,
                      "threshold": threshold, "ring_dim": n, "moduli": claimed,
                      "seed": _check_seed(seed).hex(), "sizes": [size]}, {"party"}, what)
    sender = int_field(meta, "party", what, KeyMaterialError, 0, n_parties)
    packed = sections[0]
    check_packed(packed, n, claimed, what)
    return Contribution(sender, tuple(claimed), packed)


def packed_size(ring_dim: int, moduli, what: str = "key polynomial") -> int:
    """Bytes of one packed polynomial of ``ring_dim`` and ``moduli`` (KeyMaterialError for
    moduli that are not ints)."""
    try:
        return native.key_polys_bytes(ring_dim, [int(q) for q in moduli], 1)
    except (TypeError, ValueError, OverflowError) as exc:
        raise KeyMaterialError(f"malformed {what}: moduli={moduli!r:.200}") from exc


def check_packed(packed, ring_dim: int, moduli, what: str) -> None:
    """KeyMaterialError naming ``what`` unless ``packed`` is one packed polynomial of these
    moduli: exact size, the moduli odd, distinct and below 2**62, every residue below its
    modulus (natively)."""
    try:
        wipe(native.decode_key_polys(packed, ring_dim, [int(q) for q in moduli], 1, what))
    except InvalidUpdate as exc:
        raise KeyMaterialError(str(exc)) from exc


def joint_b(contributions: Sequence[bytes], ring_dim: int, moduli) -> bytes:
    """sum_i b_i, packed (natively; each contribution checked again on the way)."""
    try:
        return native.sum_key_polys([bytes(c) for c in contributions], ring_dim,
                                     [int(q) for q in moduli], 1, "joint public key")
    except InvalidUpdate as exc:
        raise KeyMaterialError(str(exc)) from exc


def _joint_key(local, contributions: Sequence[bytes], seed: bytes, n_parties: int):
    if len(contributions) != n_parties:
        raise KeyMaterialError(f"the joint public key needs the contributions of all "
                               f"{n_parties} parties, got {len(contributions)}")
    n, moduli = local.params.ring_dim, local.moduli
    b = joint_b(contributions, n, moduli)
    return local.public_key(b + packed_a(seed, n, moduli), "joint public key")


def finish_keygen(state: KeygenState, contributions: Sequence[bytes]) -> Context:
    """A party's context: its key share (and the Shamir shares it accepted), encrypting under
    the joint public key (sum of ``contributions``, in party order, a) rebuilt on the party's
    own crypto context. The caller checked every contribution against its commitment; this
    checks that the party's own b_i is the one in its place."""
    if not isinstance(state, KeygenState):
        raise TypeError(f"expected a KeygenState, got {type(state).__name__}")
    if len(contributions) == state.n_parties and \
            bytes(contributions[state.party_id]) != state.contribution:
        raise KeyMaterialError(f"party {state.party_id}'s own b_i is not the one in its place "
                               "of the joint public key")
    local = state._local
    public_key, pk = _joint_key(local, contributions, state.seed, state.n_parties)
    own = state._own
    ctx = local.context(public_key, pk, role="party", secret_key=own.secret_key_bytes(),
                        party=(state.party_id, state.n_parties, state.threshold),
                        live={"secret_key": own.openfhe_objects(need_secret=True)[2]})
    shares = {j: own.key_share(j) for j in own.key_share_senders}
    return ctx.with_key_shares(shares) if shares else ctx


def server_context(contributions: Sequence[bytes], params: Optional[CKKSParams], n_parties: int,
                   threshold: Optional[int], seed: bytes) -> Context:
    """A public context of the joint public key of ``contributions`` on a crypto context made
    here from ``params`` (a simulation's; the key set-up's server takes party 0's public
    context instead, checks it natively against the contributions, and never loads
    openfhe)."""
    params = resolve(params, n_parties)
    n_parties, threshold = _check_parties(n_parties, threshold)
    local = local_crypto(params)
    public_key, pk = _joint_key(local, contributions, _check_seed(seed), n_parties)
    return local.context(public_key, pk, role="server")


def check_joint_key(public_ctx: Context, contributions: Sequence[bytes], seed: bytes) -> None:
    """KeyMaterialError unless ``public_ctx``'s public key is (sum of ``contributions``, the
    common a of ``seed``): natively, no openfhe (the server's check of party 0's public
    context)."""
    n, moduli = public_ctx.params.ring_dim, [int(q) for q in public_ctx.moduli]
    offsets = native.find_residue_arrays(public_ctx.public_key_bytes(), n, moduli,
                                          2 * len(moduli))
    blob = public_ctx.public_key_bytes()
    residues = np.concatenate([np.frombuffer(blob, dtype="<u8", count=n, offset=o)
                               for o in offsets])
    have = bytes(native.pack_key_polys(residues, n, moduli, 2, "public key"))
    want = joint_b(contributions, n, moduli) + packed_a(seed, n, moduli)
    if have != want:
        raise KeyMaterialError("the public context's key is not the sum of the parties' "
                               "contributions under the epoch's common a")


def check_party_context(ctx) -> None:
    """TypeError unless a Context; KeyMaterialError unless a threshold party's."""
    if not isinstance(ctx, Context):
        raise TypeError(f"expected a fedshield Context, got {type(ctx).__name__}")
    if not ctx.is_party:
        raise KeyMaterialError(f"this {ctx.role} context is not a threshold party context "
                               "(make party contexts with fs.keygen_threshold)")


def deal_key_shares(state: KeygenState) -> dict[int, bytes]:
    """t-of-n: Shamir shares of this party's key share, recipient id -> secret message.

    Empty in n-of-n mode. Each message goes to its recipient only (confidential channel).
    """
    if not isinstance(state, KeygenState):
        raise TypeError(f"expected a KeygenState, got {type(state).__name__}")
    own = state._own
    pid, n, t = state.party_id, state.n_parties, state.threshold
    if t == n:
        return {}
    # each tower's residues are shared mod that tower's prime; a share is the towers' shares
    # one after the other (N residues per tower)
    per_tower = [native.shamir_split(np.ascontiguousarray(residues), q, t,
                                      [i + 1 for i in range(n)])
                 for (_, residues), q in zip(own.key_residues(), own.moduli)]
    shares = [np.concatenate([tower[k] for tower in per_tower]) for k in range(n)]
    for tower in per_tower:
        for a in tower:
            wipe(a)
    out = {}
    for recipient in range(n):
        if recipient == pid:
            continue
        meta = {"sender": pid, "recipient": recipient, "n_parties": n, "threshold": t,
                "seed": state.seed.hex()}
        out[recipient] = frame(KEY_SHARE_MAGIC, meta, [shares[recipient].tobytes()],
                               version=KEY_SHARE_VERSION)
    for share in shares:
        wipe(share)
    return out


def accept_key_shares(state: KeygenState, messages: Iterable[bytes],
                      sender: Optional[int] = None) -> KeygenState:
    """A new state that also holds the key shares in ``messages`` (from deal_key_shares of the
    other parties; all of party ``sender``'s when given); rejects shares for another party,
    key epoch or federation."""
    if not isinstance(state, KeygenState):
        raise TypeError(f"expected a KeygenState, got {type(state).__name__}")
    own = state._own
    shares = {j: own.key_share(j) for j in own.key_share_senders}
    n_bytes = 8 * state.params.ring_dim * len(own.moduli)
    bounds = np.repeat(np.array(own.moduli, dtype=np.uint64), state.params.ring_dim)
    expected = 8 + 6 + _SHARE_HEAD_LIMIT + n_bytes + DIGEST
    for message in messages:
        what = "key share message"
        check_size(message, expected, what)
        meta, sections = unframe(message, KEY_SHARE_MAGIC, what, KeyMaterialError,
                                 version=KEY_SHARE_VERSION)
        if set(meta) != _SHARE_FIELDS:
            raise KeyMaterialError(f"malformed {what}: fields {sorted(meta)!r:.200}")
        claimed = int_field(meta, "sender", what, KeyMaterialError, 0, MAX_PARTIES)
        if sender is not None and claimed != sender:
            raise KeyMaterialError(f"a key share that names party {claimed} as its dealer, "
                                   f"from party {sender}")
        sender_id = claimed
        recipient = int_field(meta, "recipient", what, KeyMaterialError, 0, MAX_PARTIES)
        if meta.get("seed") != state.seed.hex():
            raise KeyMaterialError(f"key share from party {sender_id} belongs to another key "
                                   "epoch or federation (another seed)")
        if (meta.get("n_parties"), meta.get("threshold")) != (state.n_parties, state.threshold):
            raise KeyMaterialError(f"key share from party {sender_id} is for a different "
                                   "n_parties/threshold")
        if recipient != state.party_id:
            raise KeyMaterialError(f"key share from party {sender_id} is addressed to party "
                                   f"{recipient}, this is party {state.party_id}")
        if sender_id == state.party_id or sender_id >= state.n_parties:
            raise KeyMaterialError(f"key share from party {sender_id}: not another party of "
                                   f"{state.n_parties}")
        if sender_id in shares:
            raise KeyMaterialError(f"a key share from party {sender_id} is already held")
        if len(sections) != 1 or len(sections[0]) != n_bytes:
            raise KeyMaterialError(f"key share from party {sender_id} does not hold {n_bytes} "
                                   "bytes")
        if not (np.frombuffer(sections[0], dtype="<u8") < bounds).all():
            raise KeyMaterialError(f"key share from party {sender_id} has residues not below q")
        shares[sender_id] = sections[0]
    return KeygenState(state.params, state.party_id, state.n_parties, state.threshold,
                       state.seed, state.contribution, own.with_key_shares(shares),
                       state._local)


def keygen_threshold(params: Optional[CKKSParams] = None, n_parties: int = 3,
                     threshold: Optional[int] = None) -> tuple[list[Context], Context]:
    """Simulates the whole protocol in one process: (party contexts, server context).

    ``threshold`` None is n-of-n; t (n/2 < t <= n) lets any t parties decrypt.
    """
    params = params or THRESHOLD_PARAMS
    n_parties, threshold = _check_parties(n_parties, threshold)
    seed = os.urandom(SEED_BYTES)
    states = [start_keygen(params, n_parties, threshold, i, seed) for i in range(n_parties)]
    if threshold < n_parties:
        dealt = [deal_key_shares(s) for s in states]
        states = [accept_key_shares(state, [dealt[j][i] for j in range(n_parties) if j != i])
                  for i, state in enumerate(states)]
    contributions = [s.contribution for s in states]
    parties = [finish_keygen(s, contributions) for s in states]
    return parties, parties[0].public()


__all__ = ["Contribution", "KeygenState", "MAX_PARTIES", "SEED_BYTES", "THRESHOLD_PARAMS",
           "accept_key_shares", "check_joint_key", "check_packed", "check_party_context", "commitment",
           "common_a", "contribution_message", "deal_key_shares", "finish_keygen", "joint_b",
           "keygen_seed", "keygen_threshold", "packed_a", "packed_size", "read_contribution", "resolve",
           "server_context", "start_keygen"]
