"""Threshold mode: OpenFHE multiparty CKKS, n-of-n or t-of-n, with every message as bytes.

Key generation is a chain (OpenFHE ``MultipartyKeyGen``): party 0 calls :func:`start_keygen`,
each next party :func:`join_keygen` on the previous party's message, and the last message holds
the joint public key, for the server (:func:`server_context`) and for every party
(:func:`finish_keygen`). The joint secret key is the sum of the parties' key shares; nobody
ever holds it.

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
from ..errors import KeyMaterialError, ParameterError
from . import backend, flooding
from .context import Context
from .flooding import check_precision
from .frames import frame, int_field, unframe
from .keys import ciphertext_template
from .params import CKKSParams
from .wipe import wipe

KEYGEN_MAGIC = b"FSHLDKGN"    # a step of the key generation chain (public)
KEY_SHARE_MAGIC = b"FSHLDKSH"  # a Shamir share of one party's key share (secret)
MAX_PARTIES = 1024

# Threshold parties encrypt with the joint public key, and partial decryptions carry OpenFHE's
# fixed multiparty noise: the profile for 1e-6 sizes the scale for both (fedshield.he.partial).
THRESHOLD_PARAMS = CKKSParams.for_precision(keys="threshold")


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

    def __repr__(self) -> str:
        return (f"KeygenState(party={self.party_id}/{self.n_parties}, "
                f"threshold={self.threshold})")


def _keygen_message(params: CKKSParams, n_parties: int, threshold: int, modulus: int,
                    chain: list[str], crypto_context: bytes, public_key: bytes) -> bytes:
    meta = {"params": json.loads(params.to_json()), "n_parties": n_parties,
            "threshold": threshold, "modulus": modulus, "chain": chain}
    return frame(KEYGEN_MAGIC, meta, [crypto_context, public_key])


def _read_keygen_message(message) -> tuple[dict, CKKSParams, bytes, bytes]:
    meta, sections = unframe(message, KEYGEN_MAGIC, "key generation message",
                              KeyMaterialError)
    try:
        params = CKKSParams.from_dict(meta["params"])
        n_parties, threshold = _check_parties(meta["n_parties"], meta["threshold"])
        chain = meta["chain"]
        if not (isinstance(chain, list) and 1 <= len(chain) <= n_parties
                and all(isinstance(c, str) and len(c) == 64 for c in chain)):
            raise ValueError(f"chain of {len(chain) if isinstance(chain, list) else chain!r}")
        int_field(meta, "modulus", "key generation message", ValueError, 3, 2**62)
        if len(sections) != 2:
            raise ValueError(f"{len(sections)} sections, expected 2")
    except (KeyError, ValueError, TypeError, ParameterError) as exc:
        raise KeyMaterialError(f"malformed key generation message: {exc}") from exc
    return meta, params, sections[0], sections[1]


def start_keygen(params: Optional[CKKSParams] = None, n_parties: int = 3,
                 threshold: Optional[int] = None) -> tuple[KeygenState, bytes]:
    """Party 0's step: a fresh crypto context and key pair. Send the message to party 1."""
    params = (params or THRESHOLD_PARAMS).for_keys("threshold", n_parties)  # a request: resolved
    n_parties, threshold = _check_parties(n_parties, threshold)
    if params.seeded:
        raise ParameterError(
            "threshold parties hold key shares and encrypt with the joint public key: use "
            "unseeded parameters, e.g. fs.CKKSParams.for_precision(keys='threshold') "
            "(or seeded=False)")
    check_precision(params, n_parties)
    cc = backend.make_crypto_context(params)
    backend.enable_multiparty(cc)
    key_pair = cc.KeyGen()
    public_key = backend.serialize(key_pair.publicKey)
    step = hashlib.sha256(public_key).hexdigest()
    state = KeygenState(params, 0, n_parties, threshold, backend.serialize(key_pair.secretKey),
                        step, {"crypto_context": cc, "secret_key": key_pair.secretKey})
    message = _keygen_message(params, n_parties, threshold, int(cc.GetModulusCKKS()), [step],
                              backend.serialize(cc), public_key)
    return state, message


def join_keygen(message: bytes, party_id: int) -> tuple[KeygenState, bytes]:
    """Party ``party_id``'s step on the previous party's message; send the result onward
    (the last party's message is the joint public key: give it to everyone and the server)."""
    meta, params, cc_bytes, public_key = _read_keygen_message(message)
    n_parties, chain = meta["n_parties"], meta["chain"]
    if len(chain) >= n_parties:
        raise KeyMaterialError(f"key generation is already complete ({n_parties} parties)")
    if party_id != len(chain):
        raise KeyMaterialError(f"this message is for party {len(chain)}, not party {party_id!r}")
    cc = backend.load_crypto_context(cc_bytes)
    backend.enable_multiparty(cc)
    key_pair = cc.MultipartyKeyGen(backend.load_public_key(public_key))
    next_public = backend.serialize(key_pair.publicKey)
    step = hashlib.sha256(next_public).hexdigest()
    state = KeygenState(params, party_id, n_parties, meta["threshold"],
                        backend.serialize(key_pair.secretKey), step,
                        {"crypto_context": cc, "secret_key": key_pair.secretKey})
    return state, _keygen_message(params, n_parties, meta["threshold"], meta["modulus"],
                                  chain + [step], cc_bytes, next_public)


def _joint(message: bytes):
    meta, params, cc_bytes, public_key = _read_keygen_message(message)
    if len(meta["chain"]) != meta["n_parties"]:
        raise KeyMaterialError(f"key generation is not complete: {len(meta['chain'])} of "
                               f"{meta['n_parties']} parties have joined")
    return meta, params, cc_bytes, public_key


def _build_context(params: CKKSParams, cc, cc_bytes: bytes, public_key: bytes, **extra) -> Context:
    pk = backend.load_public_key(public_key)
    template, layout, moduli = ciphertext_template(cc, pk, params)
    live = {"crypto_context": cc, "public_key": pk, **extra.pop("live", {})}
    return Context(params=params, modulus=moduli[0], moduli=moduli, crypto_context=cc_bytes,
                   public_key=public_key, template=template, ct_layout=layout, live=live,
                   **extra)


def server_context(message: bytes) -> Context:
    """The server's context from the final key generation message: joint public key only."""
    _, params, cc_bytes, public_key = _joint(message)
    cc = backend.load_crypto_context(cc_bytes)
    backend.enable_multiparty(cc)
    return _build_context(params, cc, cc_bytes, public_key, role="server")


def finish_keygen(state: KeygenState, message: bytes) -> Context:
    """A party's context: its key share, encrypting under the joint public key of ``message``.

    Checks that the party's own step is part of the chain that made the joint key.
    """
    if not isinstance(state, KeygenState):
        raise TypeError(f"expected a KeygenState, got {type(state).__name__}")
    meta, params, cc_bytes, public_key = _joint(message)
    if (params != state.params or meta["n_parties"] != state.n_parties
            or meta["threshold"] != state.threshold):
        raise KeyMaterialError("the final key generation message is for another federation "
                               "(parameters, n_parties or threshold differ)")
    if meta["chain"][state.party_id] != state._step_digest:
        raise KeyMaterialError(f"party {state.party_id}'s key share is not part of the chain "
                               "that made this joint public key")
    return _build_context(params, state._live["crypto_context"], cc_bytes, public_key,
                          role="party", secret_key=state._secret_key,
                          party=(state.party_id, state.n_parties, state.threshold),
                          live={"secret_key": state._live["secret_key"]})


# -- each party's own key, checked against its step of the chain --------------------------------
def _public_polys(message: bytes, ring_dim: int, moduli) -> tuple[list, list]:
    """(b, a) of the public key a key generation message carries, residues per tower."""
    _, _, _, public_key = _read_keygen_message(message)
    return _key_polys(public_key, ring_dim, moduli)


def _key_polys(public_key: bytes, ring_dim: int, moduli) -> tuple[list, list]:
    towers = len(moduli)
    offsets = _native.find_residue_arrays(public_key, ring_dim, list(moduli), 2 * towers)
    polys = [np.frombuffer(public_key, dtype="<u8", count=ring_dim, offset=o) for o in offsets]
    return polys[:towers], polys[towers:]


def step_contribution(previous: Optional[bytes], message: bytes, ring_dim: int,
                      moduli) -> list[np.ndarray]:
    """What one step of the chain added to the joint public key: b_k = b(after) - b(before)
    (party 0: its own b), per tower. With a of the joint key, (b_k, a) is party k's own public
    key: b_k = e_k - a * s_k."""
    after, _ = _public_polys(message, ring_dim, moduli)
    if previous is None:
        return [np.array(b) for b in after]
    before, _ = _public_polys(previous, ring_dim, moduli)
    # q < 2**62: x + q - y stays below 2**64
    return [(x + np.uint64(q) - y) % np.uint64(q) for x, y, q in zip(after, before, moduli)]


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
                       flooding.flood_width(params, party_ctx.n_parties))
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


def accept_key_shares(party_ctx: Context, messages: Iterable[bytes]) -> Context:
    """A new party context that also holds the key shares in ``messages`` (from deal_key_shares
    of the other parties); rejects shares for another party, context or federation."""
    check_party_context(party_ctx)
    shares = {j: party_ctx.key_share(j) for j in party_ctx.key_share_senders}
    n_bytes = 8 * party_ctx.params.ring_dim * len(party_ctx.moduli)
    bounds = np.repeat(np.array(party_ctx.moduli, dtype=np.uint64), party_ctx.params.ring_dim)
    for message in messages:
        what = "key share message"
        meta, sections = unframe(message, KEY_SHARE_MAGIC, what, KeyMaterialError)
        sender = int_field(meta, "sender", what, KeyMaterialError, 0, MAX_PARTIES)
        recipient = int_field(meta, "recipient", what, KeyMaterialError, 0, MAX_PARTIES)
        if meta.get("context_fp") != party_ctx.fingerprint.hex():
            raise KeyMaterialError(f"key share from party {sender} belongs to another context")
        if (meta.get("n_parties"), meta.get("threshold")) != (party_ctx.n_parties,
                                                               party_ctx.threshold):
            raise KeyMaterialError(f"key share from party {sender} is for a different "
                                   "n_parties/threshold")
        if recipient != party_ctx.party_id:
            raise KeyMaterialError(f"key share from party {sender} is addressed to party "
                                   f"{recipient}, this is party {party_ctx.party_id}")
        if sender == party_ctx.party_id or sender >= party_ctx.n_parties:
            raise KeyMaterialError(f"key share from party {sender}: not another party of "
                                   f"{party_ctx.n_parties}")
        if sender in shares:
            raise KeyMaterialError(f"a key share from party {sender} is already held")
        if len(sections) != 1 or len(sections[0]) != n_bytes:
            raise KeyMaterialError(f"key share from party {sender} does not hold {n_bytes} bytes")
        if not (np.frombuffer(sections[0], dtype="<u8") < bounds).all():
            raise KeyMaterialError(f"key share from party {sender} has residues not below q")
        shares[sender] = sections[0]
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
        state, message = join_keygen(message, party_id)
        states.append(state)
    parties = [finish_keygen(s, message) for s in states]
    if threshold < n_parties:
        dealt = [deal_key_shares(p) for p in parties]
        parties = [accept_key_shares(p, [dealt[j][i] for j in range(n_parties) if j != i])
                   for i, p in enumerate(parties)]
    return parties, server_context(message)


__all__ = ["KeygenState", "MAX_PARTIES", "THRESHOLD_PARAMS", "accept_key_shares",
           "check_party_context", "deal_key_shares", "finish_keygen", "join_keygen",
           "keygen_threshold", "server_context", "start_keygen"]
