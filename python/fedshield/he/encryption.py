"""Key holders' operations on updates: encrypt_update and decrypt_update.

All of it is native (csrc/ckks.cpp: OpenFHE's encoding, encryption and decryption, written
anew and checked against OpenFHE in the tests), on the native thread pool with the GIL
released. OpenFHE only generates the keys.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from .. import native
from ..base.errors import (HeadroomError, IncompatibleUpdate, InvalidUpdate, KeyMaterialError,
                      ParameterError, PrecisionError)
from . import flooding, seeded
from .arrays import as_tensors
from .context import Context
from .layout import Layout
from .params import DEFAULT_TOLERANCE, power_of_two_bound
from .update import KIND_CLIENT, PACKING_CODE, EncryptedUpdate

log = logging.getLogger("fedshield")

# DEFAULT_TOLERANCE (params): encryption refuses parameters that cannot reach it, decryption
# refuses an average that may be off by more.


def default_weight_bound(params, weight: float) -> float:
    """The weight bound of an update encrypted with none passed: the context's shared default
    (CKKSParams.default_weight_bound, so that updates of any weights up to it sum), or, for
    parameters with max_weight=0, the weight's own next power of two (such an update then sums
    only with updates of the same bound)."""
    shared = params.default_weight_bound
    if shared is None:
        return power_of_two_bound(weight)
    if weight > shared:
        raise ParameterError(
            f"weight={weight!r} is above {shared:g}, the default weight bound of these "
            f"parameters (max_weight={params.max_weight}): pass weight_bound= (the round's, "
            "shared by every update summed with this one), or make the keys with "
            "fs.CKKSParams(max_weight=...) at least this weight")
    return shared


def _check_workers(workers) -> None:
    """``workers`` is accepted for callers written when encryption ran in worker processes;
    every call now runs on the native thread pool (``threads``)."""
    if not (workers is None or (isinstance(workers, int) and workers >= 1)):
        raise ParameterError(f"workers={workers!r} must be None or an int >= 1")


def ckks_ring(ctx: Context) -> tuple:
    """(ring_dim, moduli, roots of unity, scale_bits, complex packing): the ring the native
    CKKS calls (csrc/ckks.cpp) work in."""
    p = ctx.params

    def ring() -> tuple:
        try:
            roots = ctx.tower_roots
        except ParameterError as exc:
            raise KeyMaterialError(f"the context's ciphertext template names no usable tower "
                                   f"parameters ({exc}); is the context file genuine?") from exc
        return p.ring_dim, list(ctx.moduli), list(roots), p.scale_bits, p.packing == "complex"

    return ctx.cached("ckks_ring", ring)


def _public_residues(ctx: Context) -> tuple[np.ndarray, np.ndarray]:
    """The public key's two polynomials (p0, p1), every tower, evaluation form, as OpenFHE
    serializes them (parsed, never guessed: exactly 2T residue arrays)."""
    def parse():
        blob = ctx.public_key_bytes()
        n, moduli = ctx.params.ring_dim, list(ctx.moduli)
        offsets = native.find_residue_arrays(blob, n, moduli, 2 * len(moduli))
        arrays = [np.frombuffer(blob, dtype="<u8", count=n, offset=off) for off in offsets]
        towers = len(moduli)
        return (np.ascontiguousarray(np.concatenate(arrays[:towers])),
                np.ascontiguousarray(np.concatenate(arrays[towers:])))
    return ctx.cached("public_residues", parse)


def public_key_ciphertext(ctx: Context, *, zero_b: bool = False) -> bytes:
    """The context's public key (b, a) written into its ciphertext template, (0, a) with
    ``zero_b``: the key check decrypts the first, the key probes partially decrypt the
    second."""
    b, a = _public_residues(ctx)
    template, layout = ctx.ciphertext_template
    towers, n = len(ctx.moduli), ctx.params.ring_dim
    buf = bytearray(template)
    for t in range(towers):
        c0, c1 = layout[1 + towers + t], layout[1 + 2 * towers + t]
        buf[c0:c0 + 8 * n] = bytes(8 * n) if zero_b else b[t * n:(t + 1) * n].tobytes()
        buf[c1:c1 + 8 * n] = a[t * n:(t + 1) * n].tobytes()
    return bytes(buf)


def check_context(ctx) -> None:
    if not isinstance(ctx, Context):
        raise TypeError(f"expected a fedshield Context, got {type(ctx).__name__}")


def _encryption_layout(ctx: Context, first_ct: bytes) -> tuple:
    """Where the residues sit in the ciphertexts this context's openfhe objects produce.

    Not always the template's layout: a public key deserialized from a context file (any
    client that loads its context) makes ciphertexts whose second element parameters are
    serialized in full instead of as a cereal back-reference, 144 bytes longer than the
    template made at keygen. Using the template's offsets there failed every encryption
    ("serialized ciphertext has 263035 bytes, the template has 262891"). So parse one of our
    own ciphertexts once per size and cache its layout; encode_ciphertexts still checks every
    ciphertext against it (size, length words, residues below q).
    """
    def locate() -> tuple:
        template_layout = ctx.ciphertext_template[1]
        if len(first_ct) == template_layout[-1]:
            return template_layout
        return tuple(native.locate_residues(first_ct, ctx.params.ring_dim, list(ctx.moduli)))

    return ctx.cached(("encrypt_layout", len(first_ct)), locate)


def _describe_bad_value(layout: Layout, arrays: list, masks: list, scale: float, bound: float,
                        exc: Exception) -> str:
    """Names the first kept value that is not finite or over the headroom (error path only)."""
    for spec, arr, m in zip(layout.specs, arrays, masks):
        bad = ~(np.abs(arr.astype(np.float64) * scale) <= bound)  # also NaN
        if m is not None:
            bad &= m.astype(bool)
        if bad.any():
            j = int(np.argmax(bad))
            index = tuple(int(i) for i in np.unravel_index(j, spec.shape)) if spec.shape else ()
            value = float(arr[j])
            what = ("is not finite" if not math.isfinite(value) else
                    f"times weight/weight_bound={scale:g} exceeds the CKKS headroom {bound:g} "
                    "(CKKSParams.value_bound)")
            return f"state[{spec.name!r}] at {index}: value {value!r} {what}"
    return str(exc)


@dataclass(frozen=True)
class PackedUpdate:
    """An update packed into slot values, not yet encrypted: ``buffer`` holds
    ``n_ciphertexts * values_per_ciphertext`` pre-weighted values, ``header`` the wire header
    its ciphertexts will travel under. Whoever encrypts it may split it by ciphertext
    (:func:`encrypt_ciphertexts` with ``start``/``stop``, e.g. one slice per rank of a site)
    and :func:`seal_update` stitches the serialized ciphertexts back into one update."""

    buffer: np.ndarray
    header: dict

    @property
    def n_ciphertexts(self) -> int:
        return self.header["n_ciphertexts"]


def pack_update(ctx: Context, state: Mapping, layout: Layout, weight: float = 1.0,
                mask: Mapping | None = None, *, round: int = 0,
                weight_bound: float | None = None, tolerance: float = DEFAULT_TOLERANCE,
                threads: int = 0) -> PackedUpdate:
    """Checks and packs one client's update for :func:`encrypt_ciphertexts` (see
    :func:`encrypt_update` for the arguments and the errors)."""
    check_context(ctx)
    params = ctx.params
    if not isinstance(layout, Layout):
        raise TypeError(f"expected a fedshield Layout, got {type(layout).__name__}")
    if not (isinstance(round, int) and round >= 0):
        raise ParameterError(f"round={round!r} must be a non-negative int")
    if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight > 0):
        raise ParameterError(f"weight={weight!r} must be a positive finite number")
    if weight_bound is None:
        weight_bound = default_weight_bound(params, weight)
    if not (isinstance(weight_bound, (int, float)) and math.isfinite(weight_bound)
            and weight_bound > 0):
        raise ParameterError(f"weight_bound={weight_bound!r} must be a positive finite number")
    if not weight <= weight_bound:
        raise ParameterError(f"weight={weight!r} must be in (0, weight_bound={weight_bound:g}]")
    check_reachable(params, tolerance, decryptors=ctx.n_parties or 0)
    if weight_bound == params.default_weight_bound:
        check_default_bound_reachable(params, tolerance, decryptors=ctx.n_parties or 0)
    arrays = layout.flat_arrays(state)
    masks = layout.mask_arrays(mask)
    n_values = layout.kept_count(mask) + 1  # + the weight
    per_ct = params.values_per_ciphertext
    n_cts = -(-n_values // per_ct)
    scale = weight / weight_bound
    # With noise flooding, values are pre-scaled by an exact power of two (it cancels in
    # sum(w*x)/sum(w), the weight slot carrying it too): see CKKSParams.prescale_bits.
    pre = 2.0 ** params.prescale_bits
    try:
        buffer = native.pack_values(arrays, masks, scale * pre, scale * pre,
                                     params.value_bound * pre, n_cts * per_ct, threads)
    except HeadroomError as exc:
        # The native error names tensors by index; users know them by name.
        raise HeadroomError(_describe_bad_value(layout, arrays, masks, scale,
                                                params.value_bound, exc)) from exc
    header = {
        "kind": KIND_CLIENT, "n_summed": 1, "context_fp": ctx.fingerprint,
        "layout_fp": layout.fingerprint, "mask_fp": layout.mask_fingerprint(mask),
        "round": round, "n_values": n_values, "ring_dim": params.ring_dim,
        "n_ciphertexts": n_cts, "modulus": ctx.modulus, "moduli": ctx.moduli,
        "packing": PACKING_CODE[params.packing], "weight_bound": float(weight_bound),
        "elements": 1 if is_seeded(ctx) else 2,
    }
    return PackedUpdate(buffer, header)


def encrypt_packed(ctx: Context, packed: PackedUpdate, threads: int = 0) -> EncryptedUpdate:
    """A packed update encrypted natively into one update: seeded contexts under the secret key
    with ``a`` expanded from a fresh seed (only c0 and the seed travel), others under the
    (joint) public key."""
    check_context(ctx)
    header = packed.header
    ring = ckks_ring(ctx)
    if header["elements"] == 1:
        seed = seeded.new_seed()
        if native.HAVE_AES_NI:  # a expanded per ciphertext inside the native call
            blob = native.ckks_encrypt(header, ring, packed.buffer, s=_secret_residues(ctx),
                                        a_key=seeded.stream_key(ctx.fingerprint,
                                                                header["round"], seed),
                                        seed=seed, threads=threads)
        else:
            a = seeded.expand(seed, ctx.fingerprint, header["round"], header["n_ciphertexts"],
                              ctx.moduli, ctx.params.ring_dim)
            blob = native.ckks_encrypt(header, ring, packed.buffer, s=_secret_residues(ctx),
                                        a=a, seed=seed, threads=threads)
    else:
        p0, p1 = _public_residues(ctx)
        blob = native.ckks_encrypt(header, ring, packed.buffer, p0=p0, p1=p1, threads=threads)
    return EncryptedUpdate.from_bytes(blob)


def encrypt_ciphertexts(ctx: Context, packed: PackedUpdate, start: int = 0,
                        stop: int | None = None, *, workers: int | None = None,
                        threads: int = 0) -> list[bytes]:
    """Ciphertexts ``start`` to ``stop`` (default: all) of a packed update, as OpenFHE
    serializations (for a site whose ranks each encrypt a slice; :func:`seal_update` stitches
    them, and reseeds a seeded context's under one fresh seed). Encrypted natively: seeded
    contexts under the secret key with a throwaway seed's ``a``, others under the public key."""
    check_context(ctx)
    _check_workers(workers)
    n_cts = packed.n_ciphertexts
    stop = n_cts if stop is None else stop
    if not (isinstance(start, int) and isinstance(stop, int) and 0 <= start <= stop <= n_cts):
        raise ParameterError(f"ciphertexts [{start!r}, {stop!r}) are not a slice of the "
                             f"update's {n_cts}")
    if start == stop:
        return []
    per_ct = ctx.params.values_per_ciphertext
    header = {**packed.header, "n_ciphertexts": stop - start,
              "n_values": (stop - start) * per_ct}
    part = PackedUpdate(packed.buffer[start * per_ct:stop * per_ct], header)
    return rebuild_ciphertexts(ctx, encrypt_packed(ctx, part, threads), threads)


def seal_update(ctx: Context, header: dict, cts: list, threads: int = 0) -> EncryptedUpdate:
    """One update from its header and every one of its serialized ciphertexts, in order
    (however many processes encrypted them); a seeded context's c1 is replaced here by one
    fresh seed's expansion."""
    check_context(ctx)
    n_cts = header["n_ciphertexts"]
    if len(cts) != n_cts or not cts:
        raise ParameterError(f"the update needs {n_cts} ciphertexts, got {len(cts)}")
    ct_layout = _encryption_layout(ctx, bytes(cts[0]))
    seed = None
    if header["elements"] == 1:
        seed = seeded.new_seed()
        a = seeded.expand(seed, ctx.fingerprint, header["round"], n_cts, ctx.moduli,
                          ctx.params.ring_dim)
        cts = [bytearray(ct) for ct in cts]
        native.reseed_ciphertexts(cts, ct_layout, a, _secret_residues(ctx), threads)
    data = native.encode_ciphertexts(header, [bytes(ct) for ct in cts], ct_layout, threads,
                                      seed)
    return EncryptedUpdate.from_bytes(data)


def encrypt_update(ctx: Context, state: Mapping, layout: Layout, weight: float = 1.0,
                   mask: Mapping | None = None, *, round: int = 0,
                   weight_bound: float | None = None, tolerance: float = DEFAULT_TOLERANCE,
                   threads: int = 0, workers: int | None = None) -> EncryptedUpdate:
    """Encrypts one client's LoRA update (name -> torch tensor or numpy array), pre-weighted by
    ``weight`` (e.g. num_examples).

    ``weight_bound``: a public bound on the weights of every update summed with this one (it
    rides in the header and cancels out of sum(w*x)/sum(w)); updates of one aggregate must
    share it. Pass the round's: the next power of two of its largest weight, which keeps the
    average within ``tolerance`` (a bound far above the weights makes decryption refuse with
    fs.PrecisionError). None: the context's default bound (``ctx.params.default_weight_bound``,
    2**20 at the default parameters), shared by every update encrypted without one, so updates
    of any weights from 1 to ``ctx.params.max_weight`` sum within ``tolerance``; for parameters
    with ``max_weight=0``, this weight's own next power of two (it then sums only with updates
    of that bound).
    Parameters that cannot reach ``tolerance`` are refused here, before anything is sent.

    With ``mask`` (name -> bool tensor, True = kept) only kept values are packed, so pruning
    shrinks the ciphertexts; every client of a round must then use the same mask.
    Raises HeadroomError if a weighted value would overflow the modulus (never wraps).
    ``threads``: native threads (0 = FEDSHIELD_NUM_THREADS, default the CPUs this process may
    use); ``workers`` is accepted and ignored (encryption ran in worker processes once; it now
    runs on the native threads). The steps (:func:`pack_update`, :func:`encrypt_ciphertexts`,
    :func:`seal_update`) may run apart: a site of several ranks encrypts a slice on each
    (fs.Party).
    """
    _check_workers(workers)
    packed = pack_update(ctx, state, layout, weight, mask, round=round,
                         weight_bound=weight_bound, tolerance=tolerance, threads=threads)
    try:
        return encrypt_packed(ctx, packed, threads)
    finally:
        packed.buffer.fill(0.0)  # the plaintext update, pre-weighted: wipe it once encrypted


def average_error(params, n_summed: int, weight_sum: float, decryptors: int = 0) -> float:
    """A bound on how far the decrypted average of ``n_summed`` updates whose weights sum to
    ``weight_sum`` times their bound may be from the plaintext one: the encryption and
    decryption noise (CKKSParams.average_error_bound) and, with flooding, its noise at
    PRECISION_SIGMAS standard deviations, both over the weight sum."""
    error = params.average_error_bound(n_summed, weight_sum, decryptors)
    if params.flooding:
        error += (flooding.PRECISION_SIGMAS * flooding.slot_error_std(params, max(decryptors, 1))
                  / weight_sum)
    return error


def check_reachable(params, tolerance: float, decryptors: int = 0) -> None:
    """ParameterError when even a round whose weight bound is within 2x of its largest weight
    could decrypt further than ``tolerance`` from the plaintext average at these parameters."""
    if not (isinstance(tolerance, (int, float)) and tolerance > 0):
        raise ParameterError(f"tolerance={tolerance!r} must be a positive number")
    best = average_error(params, params.max_clients, 0.5, decryptors)
    if best > tolerance:
        raise ParameterError(
            f"these parameters ({params.ring_dim=}, {params.scale_bits=}, "
            f"{params.max_clients=}) keep a decrypted average within {best:.2g} at best, not "
            f"within tolerance={tolerance:g}: use fs.CKKSParams.for_precision({tolerance:g}) "
            "or raise tolerance")


def check_default_bound_reachable(params, tolerance: float, decryptors: int = 0) -> None:
    """ParameterError when one update of weight 1 at the default weight bound (the worst case
    max_weight promises) could decrypt further than ``tolerance`` from the plaintext."""
    bound = params.default_weight_bound
    best = average_error(params, 1, 1.0 / bound, decryptors)
    if best > tolerance:
        raise ParameterError(
            f"these parameters ({params.ring_dim=}, {params.scale_bits=}, "
            f"{params.max_weight=}) keep the average of weights from 1 at the default weight "
            f"bound {bound:g} within {best:.2g} at best, not within tolerance={tolerance:g}: "
            f"pass weight_bound= (the round's), or use fs.CKKSParams.for_precision("
            f"{tolerance:g}, max_weight={params.max_weight})")


def check_weight_sum(weight_sum: float, n_summed: int) -> None:
    """InvalidUpdate unless sum(w) / weight_bound decrypted in (0, n_summed]: each summed
    weight is in (0, weight_bound], so anything else means the aggregate was altered after
    encryption (a seed or a residue changed, checksum rewritten) or came from other keys."""
    # 1e-3 absorbs CKKS noise, far above it, far below the spread of a garbage decryption
    # (thousands of weight bounds at the default parameters).
    if not 0.0 < weight_sum <= n_summed + 1e-3:
        raise InvalidUpdate(
            f"the aggregate decrypts to a total weight of {weight_sum:.6g} weight bounds, "
            f"outside (0, {n_summed}] for {n_summed} summed updates: it was altered after "
            "encryption (a seed or ciphertext changed) or encrypted under other keys")


def check_average(params, weight_sum: float, n_summed: int, tolerance: float,
                  decryptors: int = 0) -> None:
    """PrecisionError when the decrypted average of ``n_summed`` updates whose weights sum to
    ``weight_sum`` times their bound may be further than ``tolerance`` from the plaintext."""
    bound = average_error(params, n_summed, weight_sum, decryptors)
    if bound > tolerance:
        raise PrecisionError(
            f"the weights of this aggregate sum to {weight_sum:.3g} x its weight bound, so its "
            f"average may be off by up to {bound:.2g}, above tolerance={tolerance:g}: encrypt "
            "with the round's weight bound (the next power of two of its largest weight), or "
            "raise tolerance")


def is_seeded(ctx: Context) -> bool:
    """Whether this context's updates are seeded: seeded parameters and the whole secret key
    (a threshold party holds a share and encrypts with the joint public key)."""
    return ctx.params.seeded and ctx.has_secret_key


def _secret_residues(ctx: Context) -> np.ndarray:
    """The secret key's residues, every tower (evaluation form, as OpenFHE serializes them)."""
    return ctx.cached("secret_residues", lambda: np.ascontiguousarray(
        np.concatenate([residues for _, residues in ctx.key_residues()])))


def rebuild_ciphertexts(ctx: Context, update: EncryptedUpdate, threads: int = 0) -> list[bytes]:
    """The update's OpenFHE ciphertexts, rebuilt from the context's template (a seeded
    update's c1: the sum of its seeds' expansions)."""
    template, ct_layout = ctx.ciphertext_template
    c1 = None
    if update.is_seeded:
        c1 = seeded.expand_sum(update.seeds, ctx.fingerprint, update.round,
                               update.n_ciphertexts, ctx.moduli, ctx.params.ring_dim)
    return native.decode_ciphertexts(update.to_bytes(), template, ct_layout, threads, c1)


def check_for_context(ctx: Context, update: EncryptedUpdate) -> None:
    """The update was made under ctx: same context fingerprint and the context's packing."""
    # The header's packing is not covered by the fingerprints: a forged byte would decode the
    # slots the wrong way and return garbage without an error.
    if update.header["packing"] != PACKING_CODE[ctx.params.packing]:
        raise IncompatibleUpdate(f"the update's packing code {update.header['packing']} is not "
                                 f"this context's ({ctx.params.packing!r})")
    if update.context_fingerprint != ctx.fingerprint:
        raise IncompatibleUpdate("the update was encrypted under another context "
                                 f"({update.context_fingerprint.hex()[:12]}... vs "
                                 f"{ctx.fingerprint.hex()[:12]}...)")


def check_for_layout(update: EncryptedUpdate, layout: Layout, mask: Mapping | None) -> None:
    """The update was packed with this layout and mask, and carries their number of values."""
    if update.layout_fingerprint != layout.fingerprint:
        raise IncompatibleUpdate("the update was packed with another layout "
                                 f"({update.layout_fingerprint.hex()[:12]}... vs "
                                 f"{layout.fingerprint.hex()[:12]}...)")
    if update.mask_fingerprint != layout.mask_fingerprint(mask):
        raise IncompatibleUpdate(
            "the update was packed with a different mask: pass the round's mask to decrypt"
            if mask is not None or update.mask_fingerprint != bytes(32)
            else "the update has no mask but one was given")
    # Fingerprints match, so the value count is fixed: a header that says otherwise was forged
    # (unchecked, a short update surfaced as a confusing HeadroomError from unpacking).
    n_kept = layout.kept_count(mask)
    if update.n_values != n_kept + 1:
        raise InvalidUpdate(f"the update carries {update.n_values} values, its layout and mask "
                            f"make {n_kept + 1} (kept values + the weight)")


def unpack_average(buffer: np.ndarray, layout: Layout, mask: Mapping | None, update,
                   params, tolerance: float, decryptors: int = 0, threads: int = 0) -> dict:
    """Decrypted slot values -> name -> tensor = sum(w*x) / sum(w) (zeros where masked out),
    refused (fs.PrecisionError) when the weights are too far below their bound for
    ``tolerance``."""
    check_weight_sum(float(buffer[update.n_values - 1]) / 2.0 ** params.prescale_bits,
                     update.n_summed)
    outs = [np.empty(s.numel, dtype=np.float32) for s in layout.specs]
    weight = native.unpack_values(buffer, outs, layout.mask_arrays(mask), True, threads)
    check_average(params, weight / 2.0 ** params.prescale_bits, update.n_summed, tolerance,
                  decryptors)
    return as_tensors({s.name: o.reshape(s.shape) for s, o in zip(layout.specs, outs)})


def decrypt_update(ctx: Context, update: EncryptedUpdate, layout: Layout,
                   mask: Mapping | None = None, *, tolerance: float = DEFAULT_TOLERANCE,
                   threads: int = 0, workers: int | None = None) -> dict:
    """Decrypts an aggregate (or an update) into name -> torch tensor = sum(w*x) / sum(w).

    Pruned positions (mask False) come back as zeros. Needs the secret key. Raises
    fs.PrecisionError rather than return an average that may be further than ``tolerance``
    from the plaintext one. ``threads`` and ``workers`` as in :func:`encrypt_update`.
    """
    check_context(ctx)
    if not isinstance(update, EncryptedUpdate):
        raise TypeError(f"expected an EncryptedUpdate, got {type(update).__name__}")
    if ctx.is_party:
        raise KeyMaterialError(
            f"this context holds only party {ctx.party_id}'s key share ({ctx.threshold} of "
            f"{ctx.n_parties} are needed): decrypt with fs.partial_decrypt on each party and "
            "fs.combine_partials")
    if not ctx.has_secret_key:
        raise KeyMaterialError(
            f"this {ctx.role} context holds no secret key and cannot decrypt; decrypt with a "
            "client context (shared-key mode) or with partial decryptions (threshold mode)")
    check_for_context(ctx, update)
    check_for_layout(update, layout, mask)
    _check_workers(workers)
    buffer = decrypt_values(ctx, update, threads)
    try:
        return unpack_average(buffer, layout, mask, update, ctx.params, tolerance,
                              threads=threads)
    finally:
        buffer.fill(0.0)  # decrypted slot values: wiped once unpacked


def decrypt_values(ctx: Context, update: EncryptedUpdate, threads: int = 0) -> np.ndarray:
    """Every slot value of an update decrypted natively with the context's secret key, flooded
    when the parameters say so (the decryption leaves the key holder): float64 buffer of
    n_ciphertexts * values_per_ciphertext values."""
    params = ctx.params
    c1, keys = None, []
    if update.is_seeded and native.HAVE_AES_NI:  # c1 expanded per ciphertext, natively
        keys = [seeded.stream_key(ctx.fingerprint, update.round, s) for s in update.seeds]
    elif update.is_seeded:
        c1 = seeded.expand_sum(update.seeds, ctx.fingerprint, update.round,
                               update.n_ciphertexts, ctx.moduli, params.ring_dim)
    hi, lo = (flooding.split_width(flooding.flood_variance(params, 1)) if params.flooding
              else (0, 0))
    return native.ckks_decrypt(update.to_bytes(), ckks_ring(ctx), _secret_residues(ctx), c1,
                                keys, hi, lo, update.n_ciphertexts * params.values_per_ciphertext,
                                threads)
