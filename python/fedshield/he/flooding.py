"""Noise flooding of CKKS decryptions against key recovery from decrypted values (IND-CPA^D).

Li and Micciancio (EUROCRYPT 2021) showed that a CKKS decryption ``m + e`` hands out the
encryption noise ``e``, which is a linear function of the secret key: a few published
decryptions of known ciphertexts recover the key. The counter-measure is *noise flooding*:
add, before anything leaves the key holder, fresh noise ``f`` so large that ``e + f`` and ``f``
are statistically indistinguishable.

What fedshield does (``CKKSParams.flood_bits = lambda > 0``):

* **Noise bound.** An aggregate of at most ``C = max_clients`` fresh public-key encryptions
  (ring dimension N, error sigma = 3.19, ternary secret and encryption randomness, P = number of
  key holders whose key shares sum to the secret; P = 1 with a shared key) has decryption noise
  ``e = sum_c (v_c * e_pk + e0_c + s * e1_c)``. Each coefficient is a sum of independent
  sub-Gaussian terms with variance proxy at most ``tau^2 = C * sigma^2 * (2 * N * P + 1)``
  (``|v_j| <= 1``; ``e_pk`` has variance ``P sigma^2`` per coefficient; ``||s||^2 <= N * P``).
  With ``t^2 = 2 ln 2 (lambda + 2 + log2 N + log2 Q)`` a union bound over all ``N * Q``
  coefficients of ``Q = 2**flood_log_queries`` decrypted ciphertexts gives
  ``|e_j| <= B = tau * t`` except with probability ``2**-(lambda + 1)``.
* **Flooding.** Every decryption that leaves a key holder (a decrypted aggregate in shared-key
  mode, every party's partial decryption in threshold mode) gets a fresh polynomial ``f`` with
  coefficients *uniform* in ``[-W, W]``, ``W = 2**(lambda + 1) * N * Q * B``. By the smudging
  lemma (Asharov et al., EUROCRYPT 2012), ``SD(f, f + e) <= |e| / (2W + 1)`` per coefficient, so
  all ``N * Q`` released coefficients together are within statistical distance
  ``N * Q * B / (2W) + 2**-(lambda+1) <= 2**-lambda`` of outputs simulated without ``e``: at most
  ``2**-lambda`` advantage from the decryptions, over up to ``Q`` decrypted ciphertexts.
  In threshold mode each party floods its own share, so the guarantee for a party holds even
  when every other party and the server collude.
* **Exactness.** The uniform integers are drawn exactly (128-bit rejection sampling from the
  kernel CSPRNG, csrc/flood.cpp) and added as an integer polynomial in every RNS tower, in
  OpenFHE's NTT representation: no floating-point sampler whose low bits would be coarse.
* **Precision.** ``W`` is about ``2**(lambda + 52)`` at the defaults, far beyond one 60-bit
  modulus. Flooding therefore runs on ``FLOOD_TOWERS = 3`` RNS towers and pre-scales the values
  by ``2**prescale_bits`` (exact powers of two that cancel in ``sum(w x) / sum(w)``), so that
  the flooding noise divided by the effective scale stays far below 1e-6
  (see :func:`slot_error_std` and the measurements in docs/THREAT_MODEL.md).

Not covered: ciphertexts whose noise exceeds the bound (a malicious server adding crafted
ciphertexts to the aggregate is out of scope, docs/THREAT_MODEL.md), more than ``Q`` decrypted
ciphertexts, and the differential privacy of the decrypted values themselves.
"""

from __future__ import annotations

import math

from .. import _native
from ..base.errors import ParameterError
from .params import CKKSParams

# OpenFHE's default standard deviation of the encryption error (CCParams GetStandardDeviation).
ERROR_SIGMA = 3.19


def noise_bound(params: CKKSParams, n_parties: int = 1) -> int:
    """B: a bound on every decryption-noise coefficient of an aggregate of up to
    ``params.max_clients`` fresh encryptions, except with probability 2**-(flood_bits + 1)."""
    n, c, p = params.ring_dim, params.max_clients, max(1, int(n_parties))
    tau = ERROR_SIGMA * math.sqrt(c * (2 * n * p + 1))
    t = math.sqrt(2 * math.log(2) * (params.flood_bits + 2 + math.log2(n)
                                     + params.flood_log_queries))
    return math.ceil(tau * t)


def flood_width(params: CKKSParams, n_parties: int = 1) -> int:
    """W: flooding coefficients are uniform in [-W, W]; checks that they fit the modulus."""
    if not params.flooding:
        raise ParameterError("these CKKSParams do not flood decryptions (flood_bits = 0)")
    n_parties = max(1, int(n_parties))
    w = (2 ** (params.flood_bits + 1) * params.ring_dim * 2 ** params.flood_log_queries
         * noise_bound(params, n_parties))
    # All present parties' flooding together must stay inside the Q/4 left for it.
    if n_parties * w >= 2 ** (params.log_q_min - 2):
        raise ParameterError(
            f"flooding at flood_bits={params.flood_bits} for {n_parties} key holder(s) needs "
            f"{(n_parties * w).bit_length()} bits, more than the {params.log_q_min - 2} these "
            "parameters leave: lower flood_bits or flood_log_queries, or raise scale_bits")
    return w


def slot_error_std(params: CKKSParams, n_parties: int = 1) -> float:
    """Predicted standard deviation of the flooding error in one decrypted real value, in units
    of the value (before the division by sum(w)/weight_bound): n_parties independent uniform
    polynomials of variance W**2/3, through the canonical embedding (variance N/2 per real
    part) and the effective scale."""
    w = flood_width(params, n_parties)
    var = n_parties * (w * w / 3) * params.ring_dim / 2
    return math.sqrt(var) / 2.0 ** params.effective_scale_bits


# The precision promise (DESIGN: <= 1e-6 for values of magnitude <= 1): keygen refuses flooding
# parameters whose predicted flooding error reaches it at PRECISION_SIGMAS standard deviations.
PRECISION_TARGET = 1e-6
PRECISION_SIGMAS = 6


def check_precision(params: CKKSParams, n_parties: int = 1) -> None:
    """Raises ParameterError when the flooding of ``n_parties`` key holders would cost more
    than PRECISION_TARGET at PRECISION_SIGMAS standard deviations (no-op without flooding)."""
    if not params.flooding:
        return
    std = slot_error_std(params, n_parties)
    if PRECISION_SIGMAS * std > PRECISION_TARGET:
        raise ParameterError(
            f"flooding at flood_bits={params.flood_bits} over 2**{params.flood_log_queries} "
            f"decryptions for {n_parties} key holder(s) leaves a decryption error of "
            f"{PRECISION_SIGMAS} x {std:.2g} > {PRECISION_TARGET:g}: lower flood_bits or "
            "flood_log_queries, or raise scale_bits")


def split_width(w: int) -> tuple[int, int]:
    """(w_hi, w_lo): the 128-bit W as the two 64-bit words csrc/flood.cpp takes."""
    if not 0 <= w < 2 ** 126:
        raise ParameterError(f"flooding width of {w.bit_length()} bits exceeds 126")
    return w >> 64, w & (2 ** 64 - 1)


def roots_of(template: bytes, moduli, ring_dim: int) -> tuple[int, ...]:
    """Each tower's primitive 2N-th root of unity, read from a serialized ciphertext: OpenFHE
    writes a tower's parameters as (..., modulus, root of unity, ...). Checked: root^N = -1."""
    out = []
    for q in moduli:
        needle = int(q).to_bytes(8, "little")
        at, root = template.find(needle), None
        if at < 0:
            raise ParameterError(f"tower modulus {q} is not in the ciphertext template")
        while at >= 0 and root is None:  # the modulus also appears in the context's own params
            value = int.from_bytes(template[at + 8:at + 16], "little")
            if 1 < value < q and pow(value, ring_dim, q) == q - 1:
                root = value
            at = template.find(needle, at + 1)
        if root is None:
            raise ParameterError(f"no primitive {2 * ring_dim}-th root of unity next to the "
                                 f"tower modulus {q} in the ciphertext template")
        out.append(root)
    return tuple(out)


def flood(blob: bytearray, offsets, moduli, roots, ring_dim: int, width: int) -> None:
    """Adds one fresh flooding polynomial to the polynomial whose residue arrays (one per
    tower, OpenFHE's NTT representation) start at ``offsets`` in ``blob``, in place."""
    hi, lo = split_width(width)
    _native.flood_residues(blob, [int(o) for o in offsets], [int(q) for q in moduli],
                           [int(r) for r in roots], ring_dim, hi, lo)


__all__ = ["ERROR_SIGMA", "PRECISION_TARGET", "check_precision", "flood", "flood_width",
           "noise_bound", "roots_of", "slot_error_std", "split_width"]
