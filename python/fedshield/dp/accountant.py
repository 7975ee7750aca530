"""The privacy accountant of DP-LoRA (pure math: the server reports epsilon without torch).

Client-level differential privacy, applied by each client to its own update before it
leaves (pruning and encryption come after, as post-processing): the update's global L2 norm
is clipped to C and noise of standard deviation sigma*C is added to every value. Neighbouring
inputs differ by one client's whole contribution (its update replaced by zero).

The noise is the discrete Gaussian on a fine grid (fedshield.dp.noise): each round is
rho-zCDP with rho = 1 / (2 sigma^2), the continuous Gaussian's, up to a term below
2**-(10**12) (Canonne, Kamath & Steinke 2020, Theorem 15, stated in fedshield.dp.noise). With
every client in every round (no subsampling), T rounds compose to

* Renyi DP of order alpha: T * alpha / (2 sigma^2) (zCDP composes additively; Mironov 2017,
  Bun & Steinke 2016), converted to (epsilon, delta) with the conversion of Balle et al. 2020
  (as in Opacus and TF Privacy): ``epsilon``, what fedshield reports. A test checks it against
  Opacus's accountant.
* ``epsilon_exact``: the exact (epsilon, delta) curve of T composed *continuous* Gaussian
  mechanisms (mu-GDP with mu = sqrt(T) / sigma; Dong, Roth & Su 2019). It is kept as the
  reference the RDP bound is tested against; it is not a guarantee for the discrete noise in
  many dimensions, so metrics.json does not report it.

A client that also guards against a curious peer replacing (not removing) its data should
read sensitivity 2C, i.e. the epsilon of sigma/2.
"""

from __future__ import annotations

import math

from ..base.errors import ParameterError
from ..base.validate import is_int

# Renyi orders searched by the RDP conversion (the grid Opacus uses, extended).
RDP_ORDERS = tuple([1.0 + x / 10.0 for x in range(1, 100)] + list(range(11, 64))
                   + [64.0, 80.0, 96.0, 128.0, 192.0, 256.0, 512.0, 1024.0])


def _check(noise_multiplier: float, rounds: int, delta: float) -> None:
    if not (isinstance(noise_multiplier, (int, float)) and noise_multiplier > 0
            and math.isfinite(noise_multiplier)):
        raise ParameterError(f"noise_multiplier={noise_multiplier!r} must be a finite number > 0")
    if not is_int(rounds) or rounds < 0:
        raise ParameterError(f"rounds={rounds!r} must be an int >= 0")
    if not (isinstance(delta, (int, float)) and 0 < delta < 1):
        raise ParameterError(f"delta={delta!r} must be in (0, 1)")


def epsilon_rdp(noise_multiplier: float, rounds: int, delta: float) -> float:
    """(epsilon, delta)-DP of `rounds` Gaussian mechanisms via Renyi DP (the standard accountant)."""
    _check(noise_multiplier, rounds, delta)
    if rounds == 0:
        return 0.0
    best = math.inf
    for a in RDP_ORDERS:
        rdp = rounds * a / (2.0 * noise_multiplier ** 2)
        eps = rdp + math.log1p(-1.0 / a) - (math.log(delta) + math.log(a)) / (a - 1.0)
        best = min(best, eps)
    return max(best, 0.0)


def _phi(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def _log_phi(x: float) -> float:
    """log Phi(x), also where Phi(x) underflows (Mills ratio: Phi(x) ~ pdf(x)/|x|, x << 0)."""
    p = _phi(x)
    if p > 0.0:
        return math.log(p)
    return -x * x / 2.0 - math.log(-x * math.sqrt(2.0 * math.pi))


def gaussian_delta(epsilon: float, mu: float) -> float:
    """delta(epsilon) of a mu-GDP mechanism: Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)
    (the second term in log space: e^eps alone overflows for large epsilon)."""
    tail = epsilon + _log_phi(-epsilon / mu - mu / 2.0)
    return _phi(-epsilon / mu + mu / 2.0) - (math.exp(tail) if tail > -745.0 else 0.0)


def epsilon_exact(noise_multiplier: float, rounds: int, delta: float) -> float:
    """The exact epsilon of `rounds` composed Gaussian mechanisms at `delta` (bisection)."""
    _check(noise_multiplier, rounds, delta)
    if rounds == 0:
        return 0.0
    mu = math.sqrt(rounds) / noise_multiplier
    if gaussian_delta(0.0, mu) <= delta:
        return 0.0
    lo, hi = 0.0, 1.0
    while gaussian_delta(hi, mu) > delta:
        lo, hi = hi, 2.0 * hi
        if hi > 1e6:
            return math.inf
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if gaussian_delta(mid, mu) > delta else (lo, mid)
    return hi


def dp_summary(clip: float, noise_multiplier: float, delta: float, rounds: int) -> dict:
    """What metrics.json reports under ``dp`` after ``rounds`` rounds."""
    return {"clip": clip, "noise_multiplier": noise_multiplier, "delta": delta,
            "rounds": rounds,
            "mechanism": "discrete Gaussian on a grid of 2**-20 of the noise std (Canonne, "
                         "Kamath & Steinke 2020), exact integer sampling from the OS CSPRNG",
            "accountant": "rdp via zCDP (Mironov 2017; Balle et al. 2020 conversion)",
            "epsilon": epsilon_rdp(noise_multiplier, rounds, delta),
            "neighbouring": "one client's whole update added or removed (sensitivity = clip)"}
