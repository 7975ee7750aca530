"""Threshold mode: OpenFHE multiparty CKKS, n-of-n or t-of-n, with every message as bytes.

Key generation is a chain (OpenFHE ``MultipartyKeyGen``): party 0 calls :func:`start_keygen`,
each next party :func:`join_keygen` on the previous party's message, and the last message holds
the joint public key, for every party (:func:`finish_keygen`) and for the server. The joint
secret key is the sum of the parties' key shares; nobody ever holds it.

No OpenFHE bytes travel. Every party makes its crypto context itself from the federation's
parameters (its own, never a message's: :func:`fedshield.he.keys.local_crypto`), and a chain
step carries only the residues of the public key so far (docs/WIRE.md, "Key set-up messages"),
which :func:`read_keygen_message` checks against the reader's own parameters and moduli (the
native codec checks sizes and residues) before they are written into a public key of the
reader's own template. A step's OpenFHE serialization used to travel and be deserialized by the
next party: one edited byte killed it.

t-of-n (t > n/2): each party Shamir-shares its own key share among the others
(:func:`deal_key_shares` -> one message per recipient, :func:`accept_key_shares`). OpenFHE's
``ShareKeys`` returns objects its Python binding cannot serialize, so the sharing is done
natively (csrc/shamir.cpp) on the residues mod q of the key's BINARY serialization, with
coefficients from the kernel CSPRNG (getrandom(2)). Key-share messages are secret: send each
one to its recipient only, over a confidential, authenticated channel.

Decryption (partial decryptions and their fusion) is in fedshield.he.partial.
"""

from __future__ import annotations

import hashlib
import json
from typing import Iterable, Optional

import numpy as np

from .. import _native
from ..base.errors import InvalidUpdate, KeyMaterialError, ParameterError
from . import backend, flooding
from .context import Context
from .flooding import check_precision
from .frames import DIGEST, frame, int_field, unframe
from .keys import PUBLIC, check_head, check_size, local_crypto
from .params import CKKSParams
from .wipe import wipe

KEYGEN_MAGIC = b"FSHLDKGN"    # a step of the key generation chain (public)
# Version 1 carried OpenFHE's serialized crypto context and public key, which the receiver
# deserialized: one edited byte crashed it. Version 2 carries residues only.
KEYGEN_VERSION = 2
_STEP_DOMAIN = b"fedshield-keygen-step-v2"
_HEAD_LIMIT = 1 << 17         # parameters, moduli and up to MAX_PARTIES digests
KEY_SHARE_MAGIC = b"FSHLDKSH"  # a Shamir share of one party's key share (secret)
_SHARE_FIELDS = {"sender", "recipient", "n_parties", "threshold", "context_fp", "sizes"}
_SHARE_HEAD_LIMIT = 1 << 10
MAX_PARTIES = 1024

# Threshold parties encrypt with the joint public key, and partial decryptions carry OpenFHE's
# fixed multiparty noise: the profile for 1e-6 sizes the scale for both (fedshield.he.partial).
THRESHOLD_PARAMS = CKKSParams.for_precision(keys="threshold")


def resolve(params: Optional[CKKSParams], n_parties) -> CKKSParams:
    """The threshold parameters of a federation of ``n_parties`` (a request resolved as every
    party resolves it: the chain's messages must name the same parameters everywhere)."""
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


# -- key generation ---------------------------------------------------------------------------
class KeygenState:
    """A party's key share between its chain step and the joint key (cannot encrypt yet)."""

    __slots__ = ("params", "party_id", "n_parties", "threshold", "_secret_key", "_step_digest",
                 "_live")

    def __init__(self, params: CKKSParams, party_id: int, n_parties: int, threshold: int,
                 secret_key: bytes, step_digest: str, live: dict) -> None:
        self.params = params
        self.party_id = party_id
        self.n_parties = n_parties
        self.threshold = threshold
        self._secret_key = secret_key
        self._step_digest = step_digest
        self._live = live

    @property
    def moduli(self) -> tuple[int, ...]:
        """The tower moduli of the party's own crypto context."""
        return self._live["local"].moduli

    def __repr__(self) -> str:
        return (f"KeygenState(party={self.party_id}/{self.n_parties}, "
                f"threshold={self.threshold})")


def step_digest(packed) -> str:
    """The digest a chain step is known by: SHA-256 of its public key's packed residues."""
    return hashlib.sha256(_STEP_DOMAIN + bytes(packed)).hexdigest()


class KeygenMessage:
    """A parsed step of the key generation chain (:func:`read_keygen_message`): its sender
    (party len(chain) - 1), the tower moduli it claims, the chain of step digests and the
    packed residues of the public key so far (b, then a; T towers each)."""

    __slots__ = ("sender", "moduli", "chain", "packed", "ring_dim")

    def __init__(self, sender: int, moduli: tuple, chain: list, packed: bytes,
                 ring_dim: int) -> None:
        self.sender, self.moduli, self.chain = sender, moduli, chain
        self.packed, self.ring_dim = packed, ring_dim

    def polys(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """(b, a) of the public key, residues per tower."""
        n, towers = self.ring_dim, len(self.moduli)
        r = _native.decode_key_polys(self.packed, n, list(self.moduli), PUBLIC, "chain step")
        polys = [r[k * n:(k + 1) * n] for k in range(2 * towers)]
        return polys[:towers], polys[towers:]

    def a_bytes(self) -> bytes:
        """The packed residues of a (every step keeps the first step's)."""
        return self.packed[len(self.packed) // 2:]


def _keygen_message(params: CKKSParams, n_parties: int, threshold: int, moduli,
                    chain: list[str], packed) -> bytes:
    meta = {"params": json.loads(params.to_json()), "n_parties": n_parties,
            "threshold": threshold, "party": len(chain) - 1, "ring_dim": params.ring_dim,
            "moduli": [int(q) for q in moduli], "chain": chain}
    return frame(KEYGEN_MAGIC, meta, [bytes(packed)], version=KEYGEN_VERSION)


def _is_digest(value) -> bool:
    return (isinstance(value, str) and len(value) == 64
            and all(c in "0123456789abcdef" for c in value))


def read_keygen_message(message, params: CKKSParams, n_parties: int, threshold: int,
                        moduli=None) -> KeygenMessage:
    """A chain step checked against the reader's own federation (``params``, n, t; and its
    own tower ``moduli`` when it has a crypto context): exact head, exact sizes, every residue
    below its modulus (native), the last digest of the chain its own. No openfhe: the server
    screens every step with it too. KeyMaterialError for anything else."""
    what = "key generation message"
    n, towers = params.ring_dim, params.n_towers
    # an upper bound from the parameters alone (q < 2**62): checked before anything is read
    check_size(message, len(KEYGEN_MAGIC) + 6 + _HEAD_LIMIT + 2 * towers * n * 8 + DIGEST, what)
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
    try:
        size = _native.key_polys_bytes(n, claimed, PUBLIC)
    except (TypeError, OverflowError) as exc:
        raise KeyMaterialError(f"malformed {what}: moduli={claimed!r:.200}") from exc
    check_head(meta, {"params": json.loads(params.to_json()), "n_parties": n_parties,
                      "threshold": threshold, "ring_dim": n, "moduli": claimed,
                      "sizes": [size]}, {"party", "chain"}, what)
    chain = meta["chain"]
    if not (isinstance(chain, list) and 1 <= len(chain) <= n_parties
            and all(_is_digest(c) for c in chain)):
        raise KeyMaterialError(f"malformed {what}: the chain is not 1 to {n_parties} "
                               "SHA-256 digests")
    sender = int_field(meta, "party", what, KeyMaterialError, 0, n_parties)
    if sender != len(chain) - 1:
        raise KeyMaterialError(f"{what} of party {sender} holds {len(chain)} steps")
    packed = sections[0]
    try:  # the moduli (odd, distinct, below 2**62) and every residue, natively
        wipe(_native.decode_key_polys(packed, n, claimed, PUBLIC, what))
    except InvalidUpdate as exc:
        raise KeyMaterialError(str(exc)) from exc
    if chain[-1] != step_digest(packed):
        raise KeyMaterialError(f"{what} of party {sender}: the last digest of its chain is not "
                               "its own public key's")
    return KeygenMessage(sender, tuple(claimed), chain, packed, n)


def start_keygen(params: Optional[CKKSParams] = None, n_parties: int = 3,
                 threshold: Optional[int] = None) -> tuple[KeygenState, bytes]:
    """Party 0's step: a crypto context made here from ``params`` (a request is resolved for
    threshold keys) and a key pair. Send the message to party 1."""
    params = resolve(params, n_parties)
    n_parties, threshold = _check_parties(n_parties, threshold)
    if params.seeded:
        raise ParameterError(
            "threshold parties hold key shares and encrypt with the joint public key: use "
            "unseeded parameters, e.g. fs.CKKSParams.for_precision(keys='threshold') "
            "(or seeded=False)")
    check_precision(params, n_parties)
    local = local_crypto(params)
    key_pair = local.cc.KeyGen()
    return _step(local, key_pair, params, n_parties, threshold, 0, [])


def _step(local, key_pair, params, n_parties, threshold, party_id, chain):
    packed = local.pack(key_pair.publicKey, PUBLIC)
    step = step_digest(packed)
    state = KeygenState(params, party_id, n_parties, threshold,
                        backend.serialize_key(key_pair.secretKey), step,
                        {"local": local, "secret_key": key_pair.secretKey})
    return state, _keygen_message(params, n_parties, threshold, local.moduli, chain + [step],
                                  packed)


def join_keygen(message: bytes, party_id: int, params: Optional[CKKSParams] = None,
                n_parties: int = 3, threshold: Optional[int] = None
                ) -> tuple[KeygenState, bytes]:
    """Party ``party_id``'s step on party ``party_id - 1``'s message, in a federation of
    ``params`` (this party's own: its crypto context is made here from them), ``n_parties``
    and ``threshold``; send the result onward (the last party's message is the joint public
    key: give it to everyone and the server)."""
    params = resolve(params, n_parties)
    n_parties, threshold = _check_parties(n_parties, threshold)
    local = local_crypto(params)
    got = read_keygen_message(message, params, n_parties, threshold, local.moduli)
    if len(got.chain) >= n_parties:
        raise KeyMaterialError(f"key generation is already complete ({n_parties} parties)")
    if party_id != len(got.chain):
        raise KeyMaterialError(f"this message is for party {len(got.chain)}, not party "
                               f"{party_id!r}")
    _, previous = local.public_key(got.packed, "chain step")
    key_pair = local.cc.MultipartyKeyGen(previous)
    return _step(local, key_pair, params, n_parties, threshold, party_id, got.chain)


def _joint(message, params: CKKSParams, n_parties: int, threshold: int, local):
    got = read_keygen_message(message, params, n_parties, threshold, local.moduli)
    if len(got.chain) != n_parties:
        raise KeyMaterialError(f"key generation is not complete: {len(got.chain)} of "
                               f"{n_parties} parties have joined")
    return got


def server_context(message: bytes, params: Optional[CKKSParams] = None, n_parties: int = 3,
                   threshold: Optional[int] = None) -> Context:
    """A public context of the joint public key in the final key generation message, on a
    crypto context made here from ``params`` (a simulation's; the key set-up's server takes
    party 0's public context instead and never loads openfhe)."""
    params = resolve(params, n_parties)
    n_parties, threshold = _check_parties(n_parties, threshold)
    local = local_crypto(params)
    got = _joint(message, params, n_parties, threshold, local)
    public_key, pk = local.public_key(got.packed, "joint public key")
    return local.context(public_key, pk, role="server")


def finish_keygen(state: KeygenState, message: bytes) -> Context:
    """A party's context: its key share, encrypting under the joint public key of ``message``,
    rebuilt on the party's own crypto context.

    Checks that the message is for the party's federation and that the party's own step is
    part of the chain that made the joint key.
    """
    if not isinstance(state, KeygenState):
        raise TypeError(f"expected a KeygenState, got {type(state).__name__}")
    local = state._live["local"]
    got = _joint(message, state.params, state.n_parties, state.threshold, local)
    if got.chain[state.party_id] != state._step_digest:
        raise KeyMaterialError(f"party {state.party_id}'s key share is not part of the chain "
                               "that made this joint public key")
    public_key, pk = local.public_key(got.packed, "joint public key")
    return local.context(public_key, pk, role="party", secret_key=state._secret_key,
                         party=(state.party_id, state.n_parties, state.threshold),
                         live={"secret_key": state._live["secret_key"]})


# -- each party's own key, checked against its step of the chain --------------------------------
def _key_polys(public_key: bytes, ring_dim: int, moduli) -> tuple[list, list]:
    towers = len(moduli)
    offsets = _native.find_residue_arrays(public_key, ring_dim, list(moduli), 2 * towers)
    polys = [np.frombuffer(public_key, dtype="<u8", count=ring_dim, offset=o) for o in offsets]
    return polys[:towers], polys[towers:]


def step_contribution(previous: Optional[KeygenMessage], message: KeygenMessage
                      ) -> list[np.ndarray]:
    """What one step of the chain added to the joint public key: b_k = b(after) - b(before)
    (party 0: its own b), per tower. With a of the joint key, (b_k, a) is party k's own public
    key: b_k = e_k - a * s_k."""
    after, _ = message.polys()
    if previous is None:
        return [np.array(b) for b in after]
    before, _ = previous.polys()
    # q < 2**62: x + q - y stays below 2**64
    return [(x + np.uint64(q) - y) % np.uint64(q)
            for x, y, q in zip(after, before, message.moduli)]


def _probe_ciphertext(ctx: Context) -> bytes:
    """(c0, c1) = (0, a), a of the joint public key, in the context's ciphertext template."""
    template, layout = ctx.ciphertext_template
    towers = len(ctx.moduli)
    n = ctx.params.ring_dim
    c0, c1 = layout[1 + towers:1 + 2 * towers], layout[1 + 2 * towers:1 + 3 * towers]
    _, a = _key_polys(ctx.public_key_bytes(), n, ctx.moduli)
    buf = bytearray(template)
    for t in range(towers):
        buf[c0[t]:c0[t] + 8 * n] = bytes(8 * n)
        buf[c1[t]:c1[t] + 8 * n] = a[t].tobytes()
    return bytes(buf)


def own_key_probe(party_ctx: Context) -> bytes:
    """This party's partial decryption, with its own key share alone, of (0, a): a * s_k plus
    OpenFHE's noise and (flooding contexts) this party's flooding, as residues (uint64, tower
    after tower). Added to the party's step contribution b_k it is small iff the party decrypts
    with the share its step of the chain committed to (:func:`own_key_matches`)."""
    check_party_context(party_ctx)
    cc, _, secret_key = party_ctx.openfhe_objects(need_secret=True)
    ct = backend.load_rebuilt_ciphertext(_probe_ciphertext(party_ctx))
    part = bytearray(backend.serialize(cc.MultipartyDecryptMain([ct], secret_key)[0]))
    params, moduli = party_ctx.params, list(party_ctx.moduli)
    offsets = _native.find_residue_arrays(part, params.ring_dim, moduli, len(moduli))
    if params.flooding:  # it leaves the party like any partial decryption
        flooding.flood(part, offsets, moduli, party_ctx.tower_roots, params.ring_dim,
                       flooding.flood_variance(params, party_ctx.n_parties))
    n = params.ring_dim
    return b"".join(bytes(part[o:o + 8 * n]) for o in offsets)


def own_key_matches(public_ctx: Context, contribution: list[np.ndarray], probe: bytes) -> bool:
    """Whether probe + b_k is a small polynomial (its coefficients, CRT-combined over the
    towers, far below the modulus): the probing party decrypts with the key share its chain
    step committed to. A wrong share leaves a uniform polynomial mod Q."""
    n, moduli = public_ctx.params.ring_dim, [int(q) for q in public_ctx.moduli]
    if len(probe) != 8 * n * len(moduli):
        return False
    d = np.frombuffer(probe, dtype="<u8")
    modulus, value = 1, 0
    for q in moduli:
        modulus *= q
    for t, (q, root) in enumerate(zip(moduli, public_ctx.tower_roots)):
        part = d[t * n:(t + 1) * n]
        if (part >= q).any():
            return False
        total = (part + contribution[t]) % np.uint64(q)
        coeffs = _native.ntt_inverse(np.ascontiguousarray(total), q, root)
        rest = modulus // q
        value = value + coeffs.astype(object) * (rest * pow(rest, -1, q))
    value = value % modulus
    largest = max(min(int(v), modulus - int(v)) for v in value)
    return largest.bit_length() <= modulus.bit_length() - 16


def check_party_context(ctx) -> None:
    """TypeError unless a Context; KeyMaterialError unless a threshold party's."""
    if not isinstance(ctx, Context):
        raise TypeError(f"expected a fedshield Context, got {type(ctx).__name__}")
    if not ctx.is_party:
        raise KeyMaterialError(f"this {ctx.role} context is not a threshold party context "
                               "(make party contexts with fs.keygen_threshold)")


def deal_key_shares(party_ctx: Context) -> dict[int, bytes]:
    """t-of-n: Shamir shares of this party's key share, recipient id -> secret message.

    Empty in n-of-n mode. Each message goes to its recipient only (confidential channel).
    """
    check_party_context(party_ctx)
    pid, n, t = party_ctx.party_id, party_ctx.n_parties, party_ctx.threshold
    if t == n:
        return {}
    # each tower's residues are shared mod that tower's prime; a share is the towers' shares
    # one after the other (N residues per tower)
    per_tower = [_native.shamir_split(np.ascontiguousarray(residues), q, t,
                                      [i + 1 for i in range(n)])
                 for (_, residues), q in zip(party_ctx.key_residues(), party_ctx.moduli)]
    shares = [np.concatenate([tower[k] for tower in per_tower]) for k in range(n)]
    for tower in per_tower:
        for a in tower:
            wipe(a)
    out = {}
    for recipient in range(n):
        if recipient == pid:
            continue
        meta = {"sender": pid, "recipient": recipient, "n_parties": n, "threshold": t,
                "context_fp": party_ctx.fingerprint.hex()}
        out[recipient] = frame(KEY_SHARE_MAGIC, meta, [shares[recipient].tobytes()])
    for share in shares:
        wipe(share)
    return out


def accept_key_shares(party_ctx: Context, messages: Iterable[bytes],
                      sender: Optional[int] = None) -> Context:
    """A new party context that also holds the key shares in ``messages`` (from deal_key_shares
    of the other parties; all of party ``sender``'s when given); rejects shares for another
    party, context or federation."""
    check_party_context(party_ctx)
    shares = {j: party_ctx.key_share(j) for j in party_ctx.key_share_senders}
    n_bytes = 8 * party_ctx.params.ring_dim * len(party_ctx.moduli)
    bounds = np.repeat(np.array(party_ctx.moduli, dtype=np.uint64), party_ctx.params.ring_dim)
    expected = 8 + 6 + _SHARE_HEAD_LIMIT + n_bytes + DIGEST
    for message in messages:
        what = "key share message"
        check_size(message, expected, what)
        meta, sections = unframe(message, KEY_SHARE_MAGIC, what, KeyMaterialError)
        if set(meta) != _SHARE_FIELDS:
            raise KeyMaterialError(f"malformed {what}: fields {sorted(meta)!r:.200}")
        claimed = int_field(meta, "sender", what, KeyMaterialError, 0, MAX_PARTIES)
        if sender is not None and claimed != sender:
            raise KeyMaterialError(f"a key share that names party {claimed} as its dealer, "
                                   f"from party {sender}")
        sender_id = claimed
        recipient = int_field(meta, "recipient", what, KeyMaterialError, 0, MAX_PARTIES)
        if meta.get("context_fp") != party_ctx.fingerprint.hex():
            raise KeyMaterialError(f"key share from party {sender_id} belongs to another context")
        if (meta.get("n_parties"), meta.get("threshold")) != (party_ctx.n_parties,
                                                               party_ctx.threshold):
            raise KeyMaterialError(f"key share from party {sender_id} is for a different "
                                   "n_parties/threshold")
        if recipient != party_ctx.party_id:
            raise KeyMaterialError(f"key share from party {sender_id} is addressed to party "
                                   f"{recipient}, this is party {party_ctx.party_id}")
        if sender_id == party_ctx.party_id or sender_id >= party_ctx.n_parties:
            raise KeyMaterialError(f"key share from party {sender_id}: not another party of "
                                   f"{party_ctx.n_parties}")
        if sender_id in shares:
            raise KeyMaterialError(f"a key share from party {sender_id} is already held")
        if len(sections) != 1 or len(sections[0]) != n_bytes:
            raise KeyMaterialError(f"key share from party {sender_id} does not hold {n_bytes} "
                                   "bytes")
        if not (np.frombuffer(sections[0], dtype="<u8") < bounds).all():
            raise KeyMaterialError(f"key share from party {sender_id} has residues not below q")
        shares[sender_id] = sections[0]
    return party_ctx.with_key_shares(shares)


def keygen_threshold(params: Optional[CKKSParams] = None, n_parties: int = 3,
                     threshold: Optional[int] = None) -> tuple[list[Context], Context]:
    """Simulates the whole protocol in one process: (party contexts, server context).

    ``threshold`` None is n-of-n; t (n/2 < t <= n) lets any t parties decrypt.
    """
    params = params or THRESHOLD_PARAMS
    n_parties, threshold = _check_parties(n_parties, threshold)
    state, message = start_keygen(params, n_parties, threshold)
    states = [state]
    for party_id in range(1, n_parties):
        state, message = join_keygen(message, party_id, params, n_parties, threshold)
        states.append(state)
    parties = [finish_keygen(s, message) for s in states]
    if threshold < n_parties:
        dealt = [deal_key_shares(p) for p in parties]
        parties = [accept_key_shares(p, [dealt[j][i] for j in range(n_parties) if j != i])
                   for i, p in enumerate(parties)]
    return parties, parties[0].public()


__all__ = ["KeygenMessage", "KeygenState", "MAX_PARTIES", "THRESHOLD_PARAMS",
           "accept_key_shares",
           "check_party_context", "deal_key_shares", "finish_keygen", "join_keygen",
           "keygen_threshold", "read_keygen_message", "resolve", "server_context", "start_keygen",
           "step_contribution", "step_digest"]
