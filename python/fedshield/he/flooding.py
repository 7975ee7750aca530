"""Noise flooding of CKKS decryptions against key recovery from decrypted values (IND-CPA^D).

Li and Micciancio (EUROCRYPT 2021) showed that a CKKS decryption ``m + e`` hands out the
encryption noise ``e``, which is a linear function of the secret key: a few published
decryptions of known ciphertexts recover the key. The counter-measure is *noise flooding*:
add, before anything leaves the key holder, fresh noise large enough that what is released
says (almost) nothing about ``e``.

What fedshield does (``CKKSParams.flood_bits = s > 0``):

* **How much.** Every decryption that leaves a key holder (a decrypted aggregate in shared-key
  mode, every party's partial decryption in threshold mode) gets a fresh polynomial whose
  coefficients are discrete Gaussians of variance ``sigma**2 = 12 * tau * 2**s * t**2``
  (Li-Micciancio-Schultz-Sorrell, CRYPTO 2022, Corollary 2, as OpenFHE's
  ``NOISE_FLOODING_DECRYPT`` implements it): IND-CPA^D with ``s`` bits of statistical security
  for ``tau = 2**flood_log_queries`` decrypted ciphertexts, ``t`` a bound on the l2 norm of the
  aggregate's decryption error, computed from the parameters (fedshield.he.flood_sizing derives
  it: ``max_clients`` fresh encryptions, secret-key or public-key under ``n_parties`` key
  shares). In threshold mode each party floods its own share, so the guarantee for a party
  holds even when every other party and the server collude.
* **Exactness.** The Gaussian is drawn exactly (Canonne-Kamath-Steinke's sampler with integer
  arithmetic only, csrc/discrete_gaussian.cpp, from the kernel CSPRNG) and added as an integer
  polynomial in every RNS tower, in OpenFHE's NTT representation: no floating-point sampler
  whose low bits would be coarse.
* **Precision.** sigma is about 2**47 at the threshold defaults, beyond one 60-bit modulus next
  to the values: flooding contexts run on ``CKKSParams.towers`` RNS towers and pre-scale
  the values by ``2**prescale_bits`` (exact powers of two that cancel in ``sum(w x) / sum(w)``),
  so that the flooding noise over the effective scale stays within the tolerance
  (:func:`slot_error_std`, :func:`check_precision`); ``CKKSParams.for_precision`` picks the
  smallest such ring and towers.

Not covered: ciphertexts whose noise exceeds the bound (a malicious server adding crafted
ciphertexts to the aggregate is out of scope, docs/THREAT_MODEL.md), more than ``tau``
decrypted ciphertexts, and the differential privacy of the decrypted values themselves.
"""

from __future__ import annotations

import math

from .. import native
from ..base.errors import ParameterError
from . import flood_sizing
from .flood_sizing import ERROR_SIGMA
from .params import PRECISION_SIGMAS, CKKSParams


def noise_l2_bound(params: CKKSParams, n_parties: int = 1) -> float:
    """t: a bound on the l2 norm of the decryption error of every aggregate of up to
    ``params.max_clients`` fresh encryptions, over 2**flood_log_queries of them, except with
    probability 2**-(flood_bits + 1): secret-key encryptions for seeded parameters, public-key
    ones under ``n_parties`` key shares otherwise."""
    return flood_sizing.noise_l2_bound(params.ring_dim, params.max_clients, params.flood_bits,
                                       params.flood_log_queries, public_key=not params.seeded,
                                       n_parties=n_parties)


def flood_variance(params: CKKSParams, n_parties: int = 1) -> int:
    """sigma**2: the integer variance of each flooding coefficient (LMSS22); checks that all
    present parties' flooding fits the quarter of Q left for it."""
    if not params.flooding:
        raise ParameterError("these CKKSParams do not flood decryptions (flood_bits = 0)")
    n_parties = max(1, int(n_parties))
    sigma2 = flood_sizing.flood_sigma2(noise_l2_bound(params, n_parties), params.flood_bits,
                                       params.flood_log_queries)
    # every party's coefficient is below 64 (sigma + 1) (the sampler's cut, exp(-1900))
    largest = n_parties * 64 * (math.isqrt(sigma2) + 1)
    if largest >= 2 ** (params.log_q_min - 2):
        raise ParameterError(
            f"flooding at flood_bits={params.flood_bits} for {n_parties} key holder(s) needs "
            f"{largest.bit_length()} bits, more than the "
            f"{params.log_q_min - 2} these parameters leave: lower flood_bits or "
            "flood_log_queries, or raise scale_bits")
    return sigma2


def slot_error_std(params: CKKSParams, n_parties: int = 1) -> float:
    """Predicted standard deviation of the flooding error in one decrypted real value, in units
    of the value (before the division by sum(w)/weight_bound): n_parties independent Gaussian
    polynomials of variance sigma**2 (and, in threshold mode, OpenFHE's smudging), through the
    canonical embedding (variance N/2 per real part) and the effective scale."""
    std = flood_sizing.slot_error_std(flood_variance(params, n_parties), params.ring_dim,
                                      n_parties, smudging=not params.seeded)
    return std / 2.0 ** params.effective_scale_bits


# The precision promise (DESIGN: <= 1e-6 for values of magnitude <= 1): keygen refuses flooding
# parameters whose predicted flooding error reaches it at PRECISION_SIGMAS standard deviations.
PRECISION_TARGET = 1e-6


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


def split_width(v: int) -> tuple[int, int]:
    """(hi, lo): the 128-bit flooding variance as the two 64-bit words csrc/flood.cpp takes."""
    if not 0 <= v < flood_sizing.MAX_FLOOD_SIGMA2:
        raise ParameterError(f"flooding variance of {v.bit_length()} bits is not below "
                             f"2**{flood_sizing.MAX_FLOOD_SIGMA2.bit_length() - 1}")
    return v >> 64, v & (2 ** 64 - 1)


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


def flood(blob: bytearray, offsets, moduli, roots, ring_dim: int, variance: int) -> None:
    """Adds one fresh flooding polynomial (discrete Gaussian of ``variance``) to the polynomial
    whose residue arrays (one per tower, OpenFHE's NTT representation) start at ``offsets`` in
    ``blob``, in place."""
    hi, lo = split_width(variance)
    native.flood_residues(blob, [int(o) for o in offsets], [int(q) for q in moduli],
                           [int(r) for r in roots], ring_dim, hi, lo)


__all__ = ["ERROR_SIGMA", "PRECISION_SIGMAS", "PRECISION_TARGET", "check_precision", "flood",
           "flood_variance", "noise_l2_bound", "roots_of", "slot_error_std", "split_width"]
