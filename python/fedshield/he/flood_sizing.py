"""How much noise flooding IND-CPA^D needs for an aggregate: the sizing arithmetic alone.

Pure arithmetic on the parameters (no openfhe, no native code), so that CKKSParams can size its
modulus from it and fedshield.he.flooding can draw the noise it states.

**The analysis** (Li, Micciancio, Schultz, Sorrell, "Securing Approximate Homomorphic
Encryption Using Differential Privacy", CRYPTO 2022, Corollary 2, in the form OpenFHE's
``NOISE_FLOODING_DECRYPT`` implements it: ``floodingNoiseStd = sqrt(12 tau) 2^(s/2)
2^noiseEstimate`` in ``gen-cryptocontext-ckksrns-internal.h``). Adding to every decryption,
before it is released, a polynomial whose coefficients are discrete Gaussians of standard deviation

    sigma = sqrt(12 * tau) * 2**(s / 2) * t

makes approximate decryption IND-CPA^D secure with ``s`` bits of statistical security for up to
``tau`` decrypted ciphertexts, where ``t`` bounds the l2 norm (coefficient embedding) of every
decrypted ciphertext's error. (OpenFHE's src/pke/examples/CKKS_NOISE_FLOODING.md notes that
the corollary's extra sqrt(2n) factor does not belong in the coefficient embedding; OpenFHE
estimates ``t`` as the rms of the canonical-embedding error, which equals the coefficient l2
norm by Parseval.)
fedshield takes ``s = flood_bits`` and ``tau = 2**flood_log_queries``.

**The aggregate's noise bound t**, computed from the parameters rather than estimated.
An aggregate of C = ``max_clients`` fresh encryptions (ring dimension N, error sigma_e = 3.19)
decrypts to ``m + e``:

* secret-key (seeded) encryptions: ``e = sum_c e_c``;
* public-key encryptions under a key of P parties (threshold keys; P = 1 for an unseeded
  shared key): ``e = v * e_pk + sum_c e0_c + s * sum_c e1_c`` with ``v = sum_c v_c`` (the
  clients' ternary randomness), ``e_pk`` the sum of the P parties' key errors and ``s`` the
  sum of their ternary secrets.

Given ``s`` and ``v``, ``e = A g`` is linear in independent discrete Gaussians ``g``, each
sub-Gaussian with variance proxy sigma_e**2 (Micciancio-Peikert 2012, Lemma 2.8), and
``A A^T = P V V^T + C I + C S S^T`` (V, S: the negacyclic matrices of v and s). Hsu, Kakade and
Zhang (2012, Theorem 1) bound ``||A g||^2 <= sigma_e^2 (T + 2 sqrt(T L x) + 2 L x)`` except
with probability e**-x, for T = tr(A A^T) = N (P ||v||^2 + C + C ||s||^2) and L >= ||A A^T||.
The ternary norms are bounded the same way: each coefficient of ``v`` (``s``) is a sum of C (P)
independent values in [-1, 1], sub-Gaussian with proxy K = C (P) (Hoeffding), so
``E exp(theta x^2) <= (1 - 2 theta K)**-1/2`` as for K times a chi-square variable, and Laurent
and Massart's bound (2000, Lemma 1, whose proof uses only that) gives ``||v||^2 <= K (N +
2 sqrt(N x) + 2 x)``; every canonical-embedding coordinate has ``|v(zeta)|^2 <= 2 K N (ln(4N) +
x)`` (the operator norm of V); each except with probability delta = e**-x. Every event over all
``tau`` decrypted ciphertexts together fails with probability at most 2**-(s + 1), which the
statistical security absorbs.

The partial-decryption smudging of threshold mode (OpenFHE's fixed sigma = 2**20 per party) is
independent of every key: it adds to the released noise and is no part of ``t``; it does count
in the precision (:func:`slot_error_std`).
"""

from __future__ import annotations

import math

from ..base.errors import ParameterError

# OpenFHE's default standard deviation of the encryption error (CCParams GetStandardDeviation).
ERROR_SIGMA = 3.19
# The variance of OpenFHE's partial-decryption smudging (NoiseFlooding::MP_SD = 2**20).
SMUDGING_SIGMA2 = 2 ** 40
# The native sampler draws flooding variances below this (csrc/discrete_gaussian.hpp).
MAX_FLOOD_SIGMA2 = 2 ** 112
# LMSS22 Corollary 2: sigma**2 = LMSS_FACTOR * tau * 2**s * t**2.
LMSS_FACTOR = 12


def _events(log_queries: int) -> int:
    """Bad events the union bound covers: 2 for the key, 3 per decrypted ciphertext."""
    return 2 + 3 * 2 ** log_queries


def noise_l2_bound(ring_dim: int, max_clients: int, flood_bits: int, log_queries: int, *,
                   public_key: bool, n_parties: int = 1) -> float:
    """t: a bound on the l2 norm of the decryption error of every one of 2**log_queries
    aggregates of up to max_clients fresh encryptions, except with probability
    2**-(flood_bits + 1) in all (the module docstring derives it)."""
    n, c, p = ring_dim, max_clients, max(1, int(n_parties))
    ln_inv_delta = (flood_bits + 1) * math.log(2) + math.log(_events(log_queries))
    if public_key:
        def norm2(k: float) -> float:  # ||x||^2 for coefficients sub-Gaussian with proxy k
            return k * (n + 2 * math.sqrt(n * ln_inv_delta) + 2 * ln_inv_delta)

        def op2(k: float) -> float:  # max |x(zeta)|^2 over the canonical embedding
            return 2 * k * n * (math.log(4 * n) + ln_inv_delta)

        trace = n * (p * norm2(c) + c + c * norm2(p))
        top = p * op2(c) + c + c * op2(p)
    else:
        trace, top = n * c, c
    x = ln_inv_delta
    return ERROR_SIGMA * math.sqrt(trace + 2 * math.sqrt(trace * top * x) + 2 * top * x)


def flood_sigma2(t: float, flood_bits: int, log_queries: int) -> int:
    """The integer variance of the flooding Gaussian, sigma**2 = 12 tau 2**s t**2 rounded up
    (LMSS22 Corollary 2); ParameterError beyond what the sampler draws exactly."""
    sigma2 = math.ceil(LMSS_FACTOR * 2.0 ** log_queries * 2.0 ** flood_bits * t * t)
    if sigma2 >= MAX_FLOOD_SIGMA2:
        raise ParameterError(
            f"flooding at flood_bits={flood_bits} over 2**{log_queries} decryptions needs a "
            f"Gaussian of variance 2**{math.log2(sigma2):.1f}, beyond the sampler's "
            f"2**{int(math.log2(MAX_FLOOD_SIGMA2))}: lower flood_bits or flood_log_queries")
    return sigma2


def slot_error_std(sigma2: int, ring_dim: int, n_parties: int, smudging: bool) -> float:
    """Standard deviation of the error one decrypted real value carries from n_parties'
    flooding (and smudging), in units of the integer coefficients: Gaussian coefficients of
    variance sigma2 through the canonical embedding (variance N/2 per real part)."""
    per_party = sigma2 + (SMUDGING_SIGMA2 if smudging else 0)
    return math.sqrt(max(1, n_parties) * per_party * ring_dim / 2)


__all__ = ["ERROR_SIGMA", "LMSS_FACTOR", "MAX_FLOOD_SIGMA2", "SMUDGING_SIGMA2",
           "flood_sigma2", "noise_l2_bound", "slot_error_std"]
