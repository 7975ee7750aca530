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

Decryption: every present party sends :func:`partial_decrypt`, anyone fuses them with
:func:`combine_partials`. When ``present`` leaves parties out, nobody rebuilds an absent party's
key: the t smallest present ids T each decrypt with
``s_i + lambda_i(T) * sum_{absent j} share_{j->i}``; since
``sum_{i in T} lambda_i(T) share_{j->i} = s_j``, the present parties' keys still sum to
``sum_j s_j``. Present parties beyond T decrypt with their own ``s_i``. The smallest present
id is the lead (``MultipartyDecryptLead``).

Precision: OpenFHE adds fixed flooding noise (sigma 2**20 per coefficient, not configurable for
CKKS in openfhe 1.6.1) to every partial decryption, so the decrypted slot values carry an error
of about 1e-6 / 2**(scale_bits - 50). Measured max |error| over 65535 values in [-1, 1]
with sum(w) = weight_bound: 6.3e-7 (3 parties) and 8.3e-7 (5) at scale 2**50, 3.8e-7 / 3.9e-7
at 2**51, 2.1e-7 / 2.2e-7 at 2**52. The weighted average divides by sum(w) / weight_bound,
which multiplies this error by weight_bound / sum(w). Threshold mode therefore defaults to
scale 2**52 (THRESHOLD_PARAMS): the error stays <= 1e-6 for values of magnitude <= 1 when
weight_bound is within 4x of sum(w) (the runner picks it so), at the price of headroom
(each client's |w/B * x| <= 1 with 64 clients).

Noise flooding (``CKKSParams(flood_bits=lambda)``, fedshield.he.flooding): each party adds its
own uniform flooding polynomial to its partial decryption before it leaves the party, at lambda
bits of statistical security; key shares are then 3 RNS towers, each Shamir-shared mod its own
prime. The pre-scaling flooding needs also drowns OpenFHE's fixed 2**20: measured max |error|
2.98e-8 (float32 rounding) over 65535 values for 3 and 5 parties at flood_bits 20 to 50.
"""

from __future__ import annotations

import hashlib
import json
import struct
from typing import Iterable, Mapping, Optional, Sequence

import numpy as np

from .. import _native
from ..errors import (IncompatibleUpdate, InvalidUpdate, KeyMaterialError,
                      NotEnoughShares, ParameterError)
from .context import Context
from .params import CKKSParams


_VERSION = 1
_DIGEST = 32
_KEYGEN_MAGIC = b"FSHLDKGN"    # a step of the key generation chain (public)
_KEY_SHARE_MAGIC = b"FSHLDKSH"  # a Shamir share of one party's key share (secret)
_PARTIAL_MAGIC = b"FSHLDPDS"    # a partial decryption of one aggregate
MAX_PARTIES = 1024

# Partial decryptions carry OpenFHE's fixed flooding noise: two more bits of scale keep the
# fused error below 1e-6 (see the module docstring for the measurements).
THRESHOLD_PARAMS = CKKSParams(scale_bits=52)


# -- framing: magic, version, JSON head, sections, SHA-256 of everything before it -----------
def _frame(magic: bytes, meta: dict, sections: Sequence[bytes]) -> bytes:
    head = json.dumps({**meta, "sizes": [len(s) for s in sections]}, sort_keys=True).encode()
    body = b"".join([magic, struct.pack("<HI", _VERSION, len(head)), head, *sections])
    return body + hashlib.sha256(body).digest()


def _unframe(blob, magic: bytes, what: str, error: type) -> tuple[dict, list[bytes]]:
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise TypeError(f"{what}: expected bytes, got {type(blob).__name__}")
    blob = bytes(blob)
    fixed = len(magic) + 6
    if len(blob) < fixed + _DIGEST or blob[:len(magic)] != magic:
        raise error(f"not a fedshield {what} (bad magic or too short)")
    body = blob[:-_DIGEST]
    if hashlib.sha256(body).digest() != blob[-_DIGEST:]:
        raise error(f"{what} bytes are corrupted (digest mismatch)")
    version, head_len = struct.unpack_from("<HI", blob, len(magic))
    if version != _VERSION:
        raise error(f"{what} format version {version} is not supported (expected {_VERSION})")
    try:
        meta = json.loads(body[fixed:fixed + head_len])
        if not isinstance(meta, dict):
            raise ValueError("head is not an object")
        sections, at = [], fixed + head_len
        for size in meta["sizes"]:
            if not (isinstance(size, int) and size >= 0):
                raise ValueError(f"section size {size!r}")
            sections.append(body[at:at + size])
            at += size
        if at != len(body):
            raise ValueError("section sizes do not add up")
    except (KeyError, ValueError, TypeError, RecursionError) as exc:
        raise error(f"malformed {what}: {exc}") from exc
    return meta, sections


def _int_field(meta: dict, name: str, what: str, error: type, low: int = 0,
               high: int = 2**63) -> int:
    value = meta.get(name)
    if not (isinstance(value, int) and not isinstance(value, bool) and low <= value < high):
        raise error(f"malformed {what}: {name}={value!r}")
    return value


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
    return _frame(_KEYGEN_MAGIC, meta, [crypto_context, public_key])


def _read_keygen_message(message) -> tuple[dict, CKKSParams, bytes, bytes]:
    meta, sections = _unframe(message, _KEYGEN_MAGIC, "key generation message",
                              KeyMaterialError)
    try:
        params = CKKSParams.from_dict(meta["params"])
        n_parties, threshold = _check_parties(meta["n_parties"], meta["threshold"])
        chain = meta["chain"]
        if not (isinstance(chain, list) and 1 <= len(chain) <= n_parties
                and all(isinstance(c, str) and len(c) == 64 for c in chain)):
            raise ValueError(f"chain of {len(chain) if isinstance(chain, list) else chain!r}")
        _int_field(meta, "modulus", "key generation message", ValueError, 3, 2**62)
        if len(sections) != 2:
            raise ValueError(f"{len(sections)} sections, expected 2")
    except (KeyError, ValueError, TypeError, ParameterError) as exc:
        raise KeyMaterialError(f"malformed key generation message: {exc}") from exc
    return meta, params, sections[0], sections[1]


def start_keygen(params: Optional[CKKSParams] = None, n_parties: int = 3,
                 threshold: Optional[int] = None) -> tuple[KeygenState, bytes]:
    """Party 0's step: a fresh crypto context and key pair. Send the message to party 1."""
    from . import backend  # noqa: PLC0415

    params = params or THRESHOLD_PARAMS
    n_parties, threshold = _check_parties(n_parties, threshold)
    if params.flooding:
        from .flooding import check_precision  # noqa: PLC0415

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
    from . import backend  # noqa: PLC0415

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
    from . import backend  # noqa: PLC0415
    from .keys import _template  # noqa: PLC0415

    pk = backend.load_public_key(public_key)
    template, layout, moduli = _template(cc, pk, params)
    live = {"crypto_context": cc, "public_key": pk, **extra.pop("live", {})}
    return Context(params=params, modulus=moduli[0], moduli=moduli, crypto_context=cc_bytes,
                   public_key=public_key, template=template, ct_layout=layout, live=live,
                   **extra)


def server_context(message: bytes) -> Context:
    """The server's context from the final key generation message: joint public key only."""
    from . import backend  # noqa: PLC0415

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


def _check_party_ctx(ctx: Context) -> None:
    if not isinstance(ctx, Context):
        raise TypeError(f"expected a fedshield Context, got {type(ctx).__name__}")
    if not ctx.is_party:
        raise KeyMaterialError(f"this {ctx.role} context is not a threshold party context "
                               "(make party contexts with fs.keygen_threshold)")


def _key_residues(ctx: Context) -> list[tuple[int, np.ndarray]]:
    """(offset, residues) of each RNS tower of this party's serialized key share."""
    n = ctx.params.ring_dim
    offsets = _native.locate_key_residues(ctx._secret_key, n, list(ctx.moduli))
    return [(off, np.frombuffer(ctx._secret_key, dtype="<u8", count=n, offset=off))
            for off in offsets]


def deal_key_shares(party_ctx: Context) -> dict[int, bytes]:
    """t-of-n: Shamir shares of this party's key share, recipient id -> secret message.

    Empty in n-of-n mode. Each message goes to its recipient only (confidential channel).
    """
    _check_party_ctx(party_ctx)
    pid, n, t = party_ctx.party_id, party_ctx.n_parties, party_ctx.threshold
    if t == n:
        return {}
    # each tower's residues are shared mod that tower's prime; a share is the towers' shares
    # one after the other (N residues per tower)
    per_tower = [_native.shamir_split(np.ascontiguousarray(residues), q, t,
                                      [i + 1 for i in range(n)])
                 for (_, residues), q in zip(_key_residues(party_ctx), party_ctx.moduli)]
    shares = [np.concatenate([tower[k] for tower in per_tower]) for k in range(n)]
    for tower in per_tower:
        for a in tower:
            a[:] = 0
    out = {}
    for recipient in range(n):
        if recipient == pid:
            continue
        meta = {"sender": pid, "recipient": recipient, "n_parties": n, "threshold": t,
                "context_fp": party_ctx.fingerprint.hex()}
        out[recipient] = _frame(_KEY_SHARE_MAGIC, meta, [shares[recipient].tobytes()])
    for share in shares:
        share[:] = 0
    return out


def accept_key_shares(party_ctx: Context, messages: Iterable[bytes]) -> Context:
    """A new party context that also holds the key shares in ``messages`` (from deal_key_shares
    of the other parties); rejects shares for another party, context or federation."""
    _check_party_ctx(party_ctx)
    shares = dict(party_ctx._key_shares)
    n_bytes = 8 * party_ctx.params.ring_dim * len(party_ctx.moduli)
    bounds = np.repeat(np.array(party_ctx.moduli, dtype=np.uint64), party_ctx.params.ring_dim)
    for message in messages:
        what = "key share message"
        meta, sections = _unframe(message, _KEY_SHARE_MAGIC, what, KeyMaterialError)
        sender = _int_field(meta, "sender", what, KeyMaterialError, 0, MAX_PARTIES)
        recipient = _int_field(meta, "recipient", what, KeyMaterialError, 0, MAX_PARTIES)
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
    return Context(params=party_ctx.params, modulus=party_ctx.modulus, moduli=party_ctx.moduli,
                   crypto_context=party_ctx._crypto_context, public_key=party_ctx._public_key,
                   template=party_ctx._template, ct_layout=party_ctx._ct_layout,
                   secret_key=party_ctx._secret_key, role="party", live=party_ctx._live,
                   party=party_ctx._party, key_shares=shares)


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


# -- decryption -------------------------------------------------------------------------------
def _present_ids(present, n_parties: int, threshold: int) -> list[int]:
    if present is None:
        return list(range(n_parties))
    try:
        ids = sorted(set(present))
    except TypeError as exc:
        raise ParameterError(f"present={present!r} must be an iterable of party ids") from exc
    if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n_parties
               for i in ids):
        raise ParameterError(f"present={present!r} must hold party ids in [0, {n_parties})")
    if len(ids) < threshold:
        raise NotEnoughShares(f"{len(ids)} parties present {ids}, decryption needs {threshold} "
                              f"of {n_parties}")
    return ids


def _as_update(agg):
    from ..update import EncryptedUpdate  # noqa: PLC0415

    if isinstance(agg, (bytes, bytearray, memoryview)):
        return EncryptedUpdate.from_bytes(agg)
    if not isinstance(agg, EncryptedUpdate):
        raise TypeError(f"expected an EncryptedUpdate, got {type(agg).__name__}")
    return agg


def _aggregate_digest(agg) -> str:
    return hashlib.sha256(b"fedshield-aggregate-v1" + agg.to_bytes()).hexdigest()


def _decryption_key(ctx: Context, present: list[int]):
    """This party's key for decrypting with ``present``: its own share, plus (among the t
    smallest present ids) the Lagrange-weighted shares of every absent party."""
    from . import backend  # noqa: PLC0415

    _, _, secret_key = ctx._openfhe(need_secret=True)
    pid, n, t = ctx.party_id, ctx.n_parties, ctx.threshold
    absent = [j for j in range(n) if j not in present]
    cover = present[:t]
    if not absent or pid not in cover:
        return secret_key
    missing = [j for j in absent if j not in ctx._key_shares]
    if missing:
        raise KeyMaterialError(f"party {pid} holds no key share from absent parties {missing} "
                               "and cannot cover for them (were the key shares dealt?)")
    key = bytearray(ctx._secret_key)
    n = ctx.params.ring_dim
    for tower, ((offset, own), q) in enumerate(zip(_key_residues(ctx), ctx.moduli)):
        lam = _native.lagrange_at_zero([i + 1 for i in cover], cover.index(pid), q)
        shares = [np.frombuffer(ctx._key_shares[j], dtype="<u8", count=n, offset=8 * n * tower)
                  for j in absent]
        combined = _native.cover_absent(np.ascontiguousarray(own), shares, lam, q)
        key[offset:offset + combined.nbytes] = combined.tobytes()
        combined[:] = 0
    try:
        return backend.load_secret_key(bytes(key))
    finally:
        key[:] = bytes(len(key))


def partial_decrypt(party_ctx: Context, agg, present: Optional[Iterable[int]] = None, *,
                    threads: int = 0) -> bytes:
    """This party's partial decryption of an aggregate, as bytes for :func:`combine_partials`.

    ``present``: ids of the parties taking part (None = all); every present party must send
    its share, and all of them must pass the same ``present``.
    """
    from . import backend  # noqa: PLC0415

    _check_party_ctx(party_ctx)
    agg = _as_update(agg)
    from ..crypto_ops import check_for_context  # noqa: PLC0415

    check_for_context(party_ctx, agg)
    if not agg.is_aggregate:
        raise IncompatibleUpdate("threshold parties only decrypt aggregates, not a single "
                                 "client's update (aggregate it with fs.aggregate first)")
    if agg.n_summed < 2:
        raise IncompatibleUpdate("an aggregate of one update is that client's update: "
                                 "threshold parties decrypt aggregates of at least 2")
    pid = party_ctx.party_id
    ids = _present_ids(present, party_ctx.n_parties, party_ctx.threshold)
    if pid not in ids:
        raise ParameterError(f"party {pid} is not among the present parties {ids}")
    lead = pid == ids[0]
    cc, _, _ = party_ctx._openfhe(need_secret=True)
    key = _decryption_key(party_ctx, ids)
    o = backend.openfhe()
    template, ct_layout = party_ctx.ciphertext_template
    params = party_ctx.params
    if params.flooding:
        from . import flooding  # noqa: PLC0415

        width = flooding.flood_width(params, party_ctx.n_parties)
        roots = party_ctx.tower_roots
    parts = []
    for blob in _native.decode_ciphertexts(agg.to_bytes(), template, ct_layout, threads):
        ct = backend.load_rebuilt_ciphertext(blob)
        part = (cc.MultipartyDecryptLead if lead else cc.MultipartyDecryptMain)([ct], key)[0]
        part = backend.serialize(part)
        if params.flooding:
            # this party's own flooding, added to its share before the share leaves it
            # (fedshield.he.flooding): the one element of a partial decryption, every tower
            buf = bytearray(part)
            offsets = _native.find_residue_arrays(buf, params.ring_dim, list(party_ctx.moduli),
                                                  len(party_ctx.moduli))
            flooding.flood(buf, offsets, party_ctx.moduli, roots, params.ring_dim, width)
            part = bytes(buf)
        parts.append(part)
    meta = {"party_id": pid, "n_parties": party_ctx.n_parties,
            "threshold": party_ctx.threshold, "present": ids, "lead": lead,
            "context_fp": party_ctx.fingerprint.hex(), "aggregate": _aggregate_digest(agg),
            "round": agg.round}
    return _frame(_PARTIAL_MAGIC, meta, parts)


class _Share:
    __slots__ = ("party_id", "meta", "parts")

    def __init__(self, blob) -> None:
        what = "partial decryption"
        self.meta, self.parts = _unframe(blob, _PARTIAL_MAGIC, what, InvalidUpdate)
        n = _int_field(self.meta, "n_parties", what, InvalidUpdate, 2, MAX_PARTIES + 1)
        _int_field(self.meta, "threshold", what, InvalidUpdate, n // 2 + 1, n + 1)
        self.party_id = _int_field(self.meta, "party_id", what, InvalidUpdate, 0, n)
        present = self.meta.get("present")
        if not (isinstance(present, list) and present == sorted(set(present)) and
                all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n
                    for i in present)):
            raise InvalidUpdate(f"malformed {what}: present={present!r}")
        if self.meta.get("lead") is not (bool(present) and self.party_id == present[0]):
            raise InvalidUpdate(f"partial decryption of party {self.party_id}: the lead flag "
                                "does not match the smallest present id")


def combine_partials(agg, shares: Iterable[bytes], layout, mask: Optional[Mapping] = None, *,
                     threads: int = 0) -> dict:
    """Fuses the partial decryptions of every present party into name -> tensor
    = sum(w*x) / sum(w), like :func:`fedshield.decrypt_update`.

    Raises NotEnoughShares when a present party's share is missing, InvalidUpdate for malformed
    or duplicate shares, IncompatibleUpdate for shares of another aggregate, context or set of
    present parties.
    """
    import torch  # noqa: PLC0415

    from ..crypto_ops import check_for_layout  # noqa: PLC0415
    from ..layout import Layout  # noqa: PLC0415
    from . import backend  # noqa: PLC0415

    agg = _as_update(agg)
    if not isinstance(layout, Layout):
        raise TypeError(f"expected a fedshield Layout, got {type(layout).__name__}")
    if isinstance(shares, (bytes, bytearray, memoryview)):
        raise TypeError("shares must be an iterable of share bytes, not one bytes object")
    parsed = [_Share(s) for s in shares]
    if not parsed:
        raise NotEnoughShares("0 partial decryptions given; every present party's is needed")
    first = parsed[0].meta
    digest = _aggregate_digest(agg)
    by_party: dict[int, _Share] = {}
    for share in parsed:
        m, pid = share.meta, share.party_id
        if m.get("context_fp") != agg.context_fingerprint.hex():
            raise IncompatibleUpdate(f"the share of party {pid} was made under another context")
        if m.get("aggregate") != digest:
            raise IncompatibleUpdate(f"the share of party {pid} decrypts a different aggregate "
                                     f"(round {m.get('round')!r}, this is round {agg.round})")
        if (m["present"], m["n_parties"], m["threshold"]) != (
                first["present"], first["n_parties"], first["threshold"]):
            raise IncompatibleUpdate(f"the share of party {pid} was made for present="
                                     f"{m['present']}, another for present={first['present']}")
        if pid not in m["present"]:
            raise IncompatibleUpdate(f"the share of party {pid}, which is not among the present "
                                     f"parties {m['present']}")
        if pid in by_party:
            raise InvalidUpdate(f"two shares of party {pid}")
        if len(share.parts) != agg.n_ciphertexts:
            raise InvalidUpdate(f"the share of party {pid} holds {len(share.parts)} partial "
                                f"ciphertexts, the aggregate {agg.n_ciphertexts}")
        by_party[pid] = share
    present, n, t = first["present"], first["n_parties"], first["threshold"]
    if len(present) < t:
        raise NotEnoughShares(f"shares made for {len(present)} present parties {present}, "
                              f"decryption needs {t} of {n}")
    missing = [i for i in present if i not in by_party]
    if missing:
        raise NotEnoughShares(f"{len(by_party)} shares given, {len(present)} needed (every "
                              f"present party of {present}, threshold {t} of {n}); missing "
                              f"parties {missing}")
    # Each share's digest binds this aggregate and partial_decrypt checked it against the
    # party's context; here only the layout and mask remain to check.
    check_for_layout(agg, layout, mask)

    o = backend.openfhe()
    packing = _packing_of(agg)
    n_ct = agg.n_ciphertexts
    order = [by_party[i] for i in present]
    buffers = []
    for k in range(n_ct):
        try:
            cts = [o.DeserializeCiphertextString(s.parts[k], o.BINARY) for s in order]
        except Exception as exc:  # the binding raises RuntimeError or a cereal error
            raise InvalidUpdate(f"a partial ciphertext does not deserialize: {exc}") from exc
        if any(ct.NumberCiphertextElements() != 1 for ct in cts):
            raise InvalidUpdate("a partial decryption holds more than one ciphertext element")
        cc = cts[0].GetCryptoContext()
        backend.enable_multiparty(cc)
        try:
            pt = cc.MultipartyDecryptFusion(cts)
        except Exception as exc:
            raise InvalidUpdate(f"the partial decryptions do not fuse: {exc}") from exc
        pt.SetLength(agg.header["ring_dim"] // 2)
        values = np.asarray(pt.GetCKKSPackedValue(), dtype=np.complex128)
        buffers.append(values.view(np.float64) if packing == "complex" else values.real.copy())
    buffer = np.ascontiguousarray(np.concatenate(buffers))
    outs = [np.empty(s.numel, dtype=np.float32) for s in layout.specs]
    _native.unpack_values(buffer, outs, layout.mask_arrays(mask), True, threads)
    return {s.name: torch.from_numpy(o_).reshape(s.shape) for s, o_ in zip(layout.specs, outs)}


def _packing_of(agg) -> str:
    from ..update import PACKING_CODE  # noqa: PLC0415

    code = agg.header["packing"]
    for name, value in PACKING_CODE.items():
        if value == code:
            return name
    raise InvalidUpdate(f"unknown packing code {code}")


__all__ = ["KeygenState", "accept_key_shares", "combine_partials", "deal_key_shares",
           "finish_keygen", "join_keygen", "keygen_threshold", "partial_decrypt",
           "server_context", "start_keygen"]

