"""Threshold mode's decryption: partial decryptions and their fusion.

Decryption: every present party sends :func:`partial_decrypt`, anyone fuses them with
:func:`combine_partials`. When ``present`` leaves parties out, nobody rebuilds an absent party's
key: the t smallest present ids T each decrypt with
``s_i + lambda_i(T) * sum_{absent j} share_{j->i}``; since
``sum_{i in T} lambda_i(T) share_{j->i} = s_j``, the present parties' keys still sum to
``sum_j s_j``. Present parties beyond T decrypt with their own ``s_i``. The smallest present
id is the lead (``MultipartyDecryptLead``).

Both steps are native (csrc/ckks.cpp) and follow OpenFHE's MultipartyDecryptLead/Main and
MultipartyDecryptFusion, which the tests check them against in both directions: a share is
(lead: c0 +) c1 * s_i + e, with e a discrete Gaussian of standard deviation
NoiseFlooding::MP_SD = 2**20 (OpenFHE's src/pke/include/constants.h, added in
src/pke/lib/schemerns/rns-multiparty.cpp in its default FIXED_NOISE_MULTIPARTY mode; drawn here
by convolution, csrc/smudging.hpp, within statistical distance 2**-92 of the discrete Gaussian
of variance 2**40, docs/THREAT_MODEL.md); fusion sums the shares and decodes.

Precision: that fixed noise (not configurable for CKKS in openfhe 1.6.1) on every partial
decryption gives the decrypted slot values an error of about 1e-6 / 2**(scale_bits - 50).
Measured with OpenFHE's own calls, max |error| over 65535 values in [-1, 1]
with sum(w) = weight_bound: 6.3e-7 (3 parties) and 8.3e-7 (5) at scale 2**50, 3.8e-7 / 3.9e-7
at 2**51, 2.1e-7 / 2.2e-7 at 2**52. The weighted average divides by sum(w) / weight_bound,
which multiplies this error by weight_bound / sum(w). Threshold mode therefore defaults to
scale 2**52 (THRESHOLD_PARAMS): the error stays <= 1e-6 for values of magnitude <= 1 when
weight_bound is within 2x of sum(w) (the Server picks it so), at the price of headroom
(each client's |w/B * x| <= 1 with 64 clients).

Noise flooding (``CKKSParams(flood_bits=lambda)``, fedshield.he.flooding): each party adds its
own discrete Gaussian flooding polynomial (sized by LMSS22 for the aggregate's noise,
fedshield.he.flood_sizing) to its partial decryption before it leaves the party, at lambda bits
of statistical security; key shares are then CKKSParams.towers RNS towers, each
Shamir-shared mod its own prime.

On the wire a partial ciphertext is its residues only (csrc/partial_codec.cpp: one polynomial,
every tower bit-packed and below its modulus), like an update's. Fusion reads them natively
and never hands a byte from outside to OpenFHE (:func:`partial_template` still rebuilds
OpenFHE's bytes from a template of one's own context, for checks against OpenFHE). Residues
edited below q still fuse; their decryption is then uniformly spread over the modulus and
fails the range check of :func:`combine_partials` (an honest aggregate's slots are bounded by
the headroom), so a damaged share raises InvalidUpdate instead of returning a wrong average.
The frame's trailer is unkeyed: a share crafted by someone who relays it is not detected here.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Mapping, Optional

import numpy as np

from .. import native
from ..base.threads import num_threads
from ..base.errors import (IncompatibleUpdate, InvalidUpdate, KeyMaterialError, NotEnoughShares,
                      ParameterError)
from . import backend, flooding
from .context import Context
from .encryption import (DEFAULT_TOLERANCE, check_context, check_for_context, check_for_layout,
                         ckks_ring, public_key_ciphertext, unpack_average)
from .frames import frame, int_field, unframe
from .layout import Layout
from .threshold import MAX_PARTIES, check_party_context
from .update import EncryptedUpdate
from .wipe import wipe

PARTIAL_MAGIC = b"FSHLDPDS"    # a partial decryption of one aggregate


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


def _as_update(agg) -> EncryptedUpdate:
    if isinstance(agg, (bytes, bytearray, memoryview)):
        return EncryptedUpdate.from_bytes(agg)
    if not isinstance(agg, EncryptedUpdate):
        raise TypeError(f"expected an EncryptedUpdate, got {type(agg).__name__}")
    return agg


def aggregate_digest(agg: EncryptedUpdate) -> str:
    """What a partial decryption names as the aggregate it decrypts (hex SHA-256,
    :attr:`EncryptedUpdate.digest`)."""
    return agg.digest


def _decryption_residues(ctx: Context, present: list[int]) -> np.ndarray:
    """This party's key for decrypting with ``present`` (T * N residues, evaluation form; the
    caller wipes it): its own share, plus (among the t smallest present ids) the
    Lagrange-weighted shares of every absent party."""
    pid, n, t = ctx.party_id, ctx.n_parties, ctx.threshold
    absent = [j for j in range(n) if j not in present]
    cover = present[:t]
    own = [np.array(residues) for _, residues in ctx.key_residues()]
    try:
        if absent and pid in cover:
            missing = [j for j in absent if ctx.key_share(j) is None]
            if missing:
                raise KeyMaterialError(f"party {pid} holds no key share from absent parties "
                                       f"{missing} and cannot cover for them (were the key "
                                       "shares dealt?)")
            ring = ctx.params.ring_dim
            for tower, q in enumerate(ctx.moduli):
                lam = native.lagrange_at_zero([i + 1 for i in cover], cover.index(pid), q)
                shares = [np.frombuffer(ctx.key_share(j), dtype="<u8", count=ring,
                                        offset=8 * ring * tower) for j in absent]
                combined = native.cover_absent(own[tower], shares, lam, q)
                wipe(own[tower])
                own[tower] = combined
        return np.ascontiguousarray(np.concatenate(own))
    finally:
        for residues in own:
            wipe(residues)


def partial_decrypt(party_ctx: Context, agg, present: Optional[Iterable[int]] = None, *,
                    threads: int = 0) -> bytes:
    """This party's partial decryption of an aggregate, as bytes for :func:`combine_partials`.

    ``present``: ids of the parties taking part (None = all); every present party must send
    its share, and all of them must pass the same ``present``.
    """
    check_party_context(party_ctx)
    agg = _as_update(agg)
    check_for_context(party_ctx, agg)
    if not agg.is_aggregate:
        raise IncompatibleUpdate("threshold parties only decrypt aggregates, not a single "
                                 "client's update (aggregate it with fs.aggregate first)")
    if agg.is_seeded:
        raise IncompatibleUpdate("a seeded aggregate is decrypted with the whole secret key, "
                                 "not by threshold parties")
    if agg.n_summed < 2:
        raise IncompatibleUpdate("an aggregate of one update is that client's update: "
                                 "threshold parties decrypt aggregates of at least 2")
    pid = party_ctx.party_id
    ids = _present_ids(present, party_ctx.n_parties, party_ctx.threshold)
    if pid not in ids:
        raise ParameterError(f"party {pid} is not among the present parties {ids}")
    lead = pid == ids[0]
    params = party_ctx.params
    hi, lo = ((flooding.split_width(flooding.flood_variance(params, party_ctx.n_parties)))
              if params.flooding else (0, 0))
    key = _decryption_residues(party_ctx, ids)
    try:
        # natively: (lead: c0 +) c1 * s_i + smudging noise (+ flooding), packed residues only
        parts = native.ckks_partial_decrypt(agg.to_bytes(), ckks_ring(party_ctx), key, lead,
                                             hi, lo, threads)
    finally:
        wipe(key)
    meta = {"party_id": pid, "n_parties": party_ctx.n_parties,
            "threshold": party_ctx.threshold, "present": ids, "lead": lead,
            "context_fp": party_ctx.fingerprint.hex(), "aggregate": aggregate_digest(agg),
            "round": agg.round, "params": json.loads(party_ctx.params.to_json())}
    return frame(PARTIAL_MAGIC, meta, parts)


class PartialDecryption:
    """A parsed partial decryption: who made it, for which aggregate and set of present
    parties, and its partial ciphertexts (checked for form here; the server screens shares
    with it before passing them on)."""

    __slots__ = ("party_id", "meta", "parts")

    def __init__(self, meta: dict, parts: list[bytes]) -> None:
        self.meta, self.parts = meta, parts
        what = "partial decryption"
        n = int_field(meta, "n_parties", what, InvalidUpdate, 2, MAX_PARTIES + 1)
        int_field(meta, "threshold", what, InvalidUpdate, n // 2 + 1, n + 1)
        self.party_id = int_field(meta, "party_id", what, InvalidUpdate, 0, n)
        int_field(meta, "round", what, InvalidUpdate)
        for key in ("context_fp", "aggregate"):
            if not isinstance(meta.get(key), str):
                raise InvalidUpdate(f"malformed {what}: {key}={meta.get(key)!r}")
        present = meta.get("present")
        if not (isinstance(present, list) and
                all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n
                    for i in present) and present == sorted(set(present))):
            raise InvalidUpdate(f"malformed {what}: present={present!r}")
        if meta.get("lead") is not (bool(present) and self.party_id == present[0]):
            raise InvalidUpdate(f"partial decryption of party {self.party_id}: the lead flag "
                                "does not match the smallest present id")

    @classmethod
    def from_bytes(cls, blob, *, views: bool = False) -> "PartialDecryption":
        """``views``: parts as read-only memoryviews of ``blob`` rather than bytes copies."""
        meta, parts = unframe(blob, PARTIAL_MAGIC, "partial decryption", InvalidUpdate,
                              views=views)
        return cls(meta, parts)

    @property
    def present(self) -> list[int]:
        return list(self.meta["present"])

    @property
    def aggregate_digest(self) -> str | None:
        return self.meta.get("aggregate")

    def check_for(self, ctx: Context, agg: EncryptedUpdate, *, digest: str | None = None,
                  residues: bool = True) -> None:
        """What anyone holding the (public) context can check without openfhe: the share was
        made under ``ctx`` for ``agg``, holds one partial ciphertext per ciphertext of ``agg``,
        and each is ``ctx``'s packed residues, every one below its tower's modulus (native;
        ``residues=False`` leaves that to a caller that fuses natively, which checks them).
        ``digest``: :func:`aggregate_digest` of ``agg`` when the caller has it (it hashes the
        whole aggregate). IncompatibleUpdate or InvalidUpdate otherwise."""
        pid = self.party_id
        if self.meta["context_fp"] != ctx.fingerprint.hex():
            raise IncompatibleUpdate(f"the share of party {pid} was made under another context")
        if self.meta.get("params") != json.loads(ctx.params.to_json()):
            raise IncompatibleUpdate(f"the share of party {pid} names other parameters than the "
                                     "context's")
        digest = aggregate_digest(agg) if digest is None else digest
        if self.meta["aggregate"] != digest or self.meta["round"] != agg.round:
            raise IncompatibleUpdate(f"the share of party {pid} decrypts a different aggregate "
                                     f"(round {self.meta['round']}, this is round {agg.round})")
        if len(self.parts) != agg.n_ciphertexts:
            raise InvalidUpdate(f"the share of party {pid} holds {len(self.parts)} partial "
                                f"ciphertexts, the aggregate {agg.n_ciphertexts}")
        for k, part in enumerate(self.parts if residues else ()):
            try:
                native.check_partial(part, ctx.params.ring_dim, list(ctx.moduli))
            except InvalidUpdate as exc:
                raise InvalidUpdate(f"the share of party {pid}, partial ciphertext {k}: "
                                    f"{exc}") from exc


def partial_template(ctx: Context) -> dict[bool, tuple[bytes, tuple]]:
    """lead flag -> (OpenFHE serialization of a partial decryption under ``ctx`` with zeroed
    residues, its layout: ring_dim, the moduli, one residue offset per tower, its size).

    Parsed once per context from real MultipartyDecryptLead/Main outputs (of the zero
    ciphertext, under a throwaway key: no key material of ``ctx`` is involved), never guessed:
    OpenFHE's outputs need not share the layout of fresh ciphertexts.
    """
    def make() -> dict[bool, tuple[bytes, tuple]]:
        cc, _, _ = ctx.openfhe_objects()
        backend.enable_multiparty(cc)
        zero = backend.load_rebuilt_ciphertext(ctx.ciphertext_template[0])
        throwaway = cc.KeyGen().secretKey
        n, moduli = ctx.params.ring_dim, list(ctx.moduli)
        out = {}
        for lead, decrypt in ((True, cc.MultipartyDecryptLead),
                              (False, cc.MultipartyDecryptMain)):
            blob = bytearray(backend.serialize(decrypt([zero], throwaway)[0]))
            offsets = native.find_residue_arrays(blob, n, moduli, len(moduli))
            for off in offsets:
                blob[off:off + 8 * n] = bytes(8 * n)
            out[lead] = (bytes(blob), (n, *moduli, *offsets, len(blob)))
        return out

    return ctx.cached("partial_template", make)


def combine_partials(agg, shares: Iterable[bytes], layout, mask: Optional[Mapping] = None, *,
                     ctx: Context, tolerance: float = DEFAULT_TOLERANCE, threads: int = 0
                     ) -> dict:
    """Fuses the partial decryptions of every present party into name -> tensor
    = sum(w*x) / sum(w), like :func:`fedshield.decrypt_update` (and like it, refuses with
    fs.PrecisionError an average that may be further than ``tolerance`` from the plaintext).

    ``ctx``: any context of the key set (a party's, or the public one): the shares' OpenFHE
    bytes are rebuilt from its template, never taken from the shares.
    Raises NotEnoughShares when a present party's share is missing, InvalidUpdate for malformed,
    damaged or duplicate shares, IncompatibleUpdate for shares of another aggregate, context or
    set of present parties.
    """
    check_context(ctx)
    agg = _as_update(agg)
    if not isinstance(layout, Layout):
        raise TypeError(f"expected a fedshield Layout, got {type(layout).__name__}")
    if isinstance(shares, (bytes, bytearray, memoryview)):
        raise TypeError("shares must be an iterable of share bytes, not one bytes object")
    check_for_context(ctx, agg)
    shares = list(shares)
    # The frames' checksums first (the fusion needs the shares), then the aggregate's digest
    # (hashed unless this object's already was), meanwhile next to the fusion: hashlib and the
    # fusion release the GIL. Every check below still passes before a fused value leaves (a
    # failed one wipes them).
    with ThreadPoolExecutor(max_workers=max(1, min(num_threads(), len(shares) + 1))) as pool:
        jobs = [pool.submit(PartialDecryption.from_bytes, blob, views=True) for blob in shares]
        digest_job = pool.submit(aggregate_digest, agg)
        parsed = [job.result() for job in jobs]
        if not parsed:
            raise NotEnoughShares("0 partial decryptions given; every present party's is "
                                  "needed")
        order = _fusion_order(parsed)
        buffer, failure = None, None
        if order is not None:
            try:
                buffer = native.ckks_fuse([share.parts for share in order], ckks_ring(ctx),
                                           agg.n_ciphertexts * ctx.params.values_per_ciphertext,
                                           threads)
            except InvalidUpdate as exc:
                failure = exc
        try:
            digest = digest_job.result()
            present = _check_shares(parsed, ctx, agg, digest)
            # Each share's digest binds this aggregate and partial_decrypt checked it against
            # the party's context; here only the layout and mask remain to check.
            check_for_layout(agg, layout, mask)
            if failure is not None:
                for share in order:  # error path only: name the share and ciphertext at fault
                    share.check_for(ctx, agg, digest=digest)
                raise failure
            _check_fused(buffer, agg, ctx.params)
            return unpack_average(buffer, layout, mask, agg, ctx.params, tolerance,
                                  decryptors=len(present), threads=threads)
        finally:
            if buffer is not None:
                buffer.fill(0.0)  # decrypted slot values: wiped once unpacked (or refused)


def _fusion_order(parsed: list[PartialDecryption]) -> Optional[list[PartialDecryption]]:
    """The shares in the order of their present parties when they are one share of each,
    all made for the same present set; None otherwise (_check_shares then says why)."""
    present = parsed[0].meta["present"]
    by_party = {share.party_id: share for share in parsed}
    if (len(by_party) != len(parsed) or sorted(by_party) != present
            or any(share.meta["present"] != present for share in parsed)):
        return None
    return [by_party[i] for i in present]


def _check_shares(parsed: list[PartialDecryption], ctx: Context, agg: EncryptedUpdate,
                  digest: str) -> list[int]:
    """Every share made under ``ctx`` for ``agg`` (its digest), for one set of present parties,
    one per present party and enough of them: the present ids, or the error."""
    first = parsed[0].meta
    by_party: dict[int, PartialDecryption] = {}
    for share in parsed:
        m, pid = share.meta, share.party_id
        share.check_for(ctx, agg, digest=digest, residues=False)  # ckks_fuse checks residues
        if (m["present"], m["n_parties"], m["threshold"]) != (
                first["present"], first["n_parties"], first["threshold"]):
            raise IncompatibleUpdate(f"the share of party {pid} was made for present="
                                     f"{m['present']}, another for present={first['present']}")
        if pid not in m["present"]:
            raise IncompatibleUpdate(f"the share of party {pid}, which is not among the present "
                                     f"parties {m['present']}")
        if pid in by_party:
            raise InvalidUpdate(f"two shares of party {pid}")
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
    return present


def _check_fused(values: np.ndarray, agg: EncryptedUpdate, params) -> None:
    """Every fused slot must lie within what an aggregate of agg.n_summed updates can hold.

    A share whose residues were changed fuses into values spread over the whole modulus
    (thousands of times the headroom), so this catches damage a frame digest recomputed by a
    relay hides; the tolerance (one unit on top of the headroom) is far above CKKS noise.
    """
    bound = (agg.n_summed * params.value_bound + 1.0) * 2.0 ** params.prescale_bits
    worst = max(float(values.max()), -float(values.min())) if values.size else 0.0
    if not worst <= bound:  # also NaN
        raise InvalidUpdate(f"the fused partial decryptions hold a value of magnitude "
                            f"{worst:.3g}, beyond the {bound:.3g} an aggregate of "
                            f"{agg.n_summed} updates can reach: a share was damaged or forged")


# -- the key check: partial decryptions of the public key's a ------------------------------------
def key_probes(party_ctx: Context, present_sets: Iterable[Optional[Iterable[int]]]
               ) -> list[bytes]:
    """This party's partial decryptions of (0, a), a of its context's public key, one per
    present set (None: all), each with the key it would decrypt with when that set takes part
    (its own key share, plus the Lagrange-weighted shares of absent parties when it covers for
    them): a * s' + OpenFHE's smudging noise and (flooding contexts) this party's flooding,
    packed (one polynomial each).

    The sum of the probes of one present set plus the joint b is small iff their keys sum to
    the joint secret (:func:`probes_match`); a party's probe with everyone present plus its
    own b_i is small iff it decrypts with the key share its b_i was made with.
    """
    check_party_context(party_ctx)
    cc, _, _ = party_ctx.openfhe_objects(need_secret=True)
    params, moduli = party_ctx.params, list(party_ctx.moduli)
    n = params.ring_dim
    ct = backend.load_rebuilt_ciphertext(public_key_ciphertext(party_ctx, zero_b=True))
    offsets_of_key = [offset for offset, _ in party_ctx.key_residues()]
    out = []
    for present in present_sets:
        ids = _present_ids(present, party_ctx.n_parties, party_ctx.threshold)
        if party_ctx.party_id not in ids:
            raise ParameterError(f"party {party_ctx.party_id} is not among the present "
                                 f"parties {ids}")
        key = _decryption_residues(party_ctx, ids)
        blob = bytearray(party_ctx.secret_key_bytes())
        part = bytearray()
        try:
            for t, offset in enumerate(offsets_of_key):
                blob[offset:offset + 8 * n] = key[t * n:(t + 1) * n].tobytes()
            secret = backend.load_secret_key(bytes(blob))
            part = bytearray(backend.serialize(cc.MultipartyDecryptMain([ct], secret)[0]))
            offsets = native.find_residue_arrays(part, n, moduli, len(moduli))
            if params.flooding:  # it leaves the party like any partial decryption
                flooding.flood(part, offsets, moduli, party_ctx.tower_roots, n,
                               flooding.flood_variance(params, party_ctx.n_parties))
            residues = np.concatenate([np.frombuffer(part, dtype="<u8", count=n, offset=o)
                                       for o in offsets])
            out.append(bytes(native.pack_key_polys(residues, n, moduli, 1, "key probe")))
        finally:
            wipe(key)
            wipe(blob)
            wipe(part)
    return out


def probes_match(public_ctx: Context, probes: Iterable[bytes], b) -> bool:
    """Whether sum(probes) + b (packed polynomials of ``public_ctx``'s ring) is a small
    polynomial: its coefficients, CRT-combined over the towers, far below the modulus. True
    when the probing keys sum to the secret of b (b = -a * s + e); a wrong key leaves a
    uniform polynomial mod Q. Natively and without openfhe: the server checks with it."""
    n, moduli = public_ctx.params.ring_dim, [int(q) for q in public_ctx.moduli]
    try:
        total = native.sum_key_polys([bytes(p) for p in probes] + [bytes(b)], n, moduli, 1,
                                      "key probe")
        d = native.decode_key_polys(total, n, moduli, 1, "key probe")
    except InvalidUpdate:
        return False
    modulus, value = 1, 0
    for q in moduli:
        modulus *= q
    if len(moduli) == 1:   # one tower: the centered residues are the coefficients
        q = moduli[0]
        coeffs = native.ntt_inverse(np.ascontiguousarray(d), q, public_ctx.tower_roots[0])
        largest = int(np.minimum(coeffs, np.uint64(q) - coeffs).max())
        return largest.bit_length() <= modulus.bit_length() - 16
    for t, (q, root) in enumerate(zip(moduli, public_ctx.tower_roots)):
        coeffs = native.ntt_inverse(np.ascontiguousarray(d[t * n:(t + 1) * n]), q, root)
        rest = modulus // q
        value = value + coeffs.astype(object) * (rest * pow(rest, -1, q))
    value = value % modulus
    largest = max(min(int(v), modulus - int(v)) for v in value)
    return largest.bit_length() <= modulus.bit_length() - 16


__all__ = ["PARTIAL_MAGIC", "PartialDecryption", "aggregate_digest", "combine_partials",
           "key_probes", "partial_decrypt", "partial_template", "probes_match"]
