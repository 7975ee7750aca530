"""DP-LoRA's mechanism: per-client clipping and discrete Gaussian noise of an update.

The noise cannot be exploited through its generator or its floating-point representation:

* **Exact, integer noise.** The clipped update is put on a grid of step ``gamma`` (a power of
  two, ``2**-GRID_BITS`` to ``2**-(GRID_BITS + 1)`` of the noise's standard deviation
  ``sigma * C``) and gets integer noise from the discrete Gaussian ``N_Z(0, s2)``, sampled
  exactly (Canonne, Kamath & Steinke, NeurIPS 2020) with integer arithmetic in the native core
  (csrc/discrete_gaussian.cpp) from the kernel CSPRNG. The sum is exact; its conversion back
  to floats is post-processing. Float Gaussians (``torch.randn``) leak the unnoised value
  through the set of floats they can reach (Mironov, CCS 2012), and torch's MT19937 is
  predictable from its outputs.
* **Exact sensitivity.** The integer vector ``z`` of the clipped update is checked exactly:
  ``||z||_2 <= Delta = C / gamma`` (shrunk until it holds; rounding to the grid could otherwise
  push the norm past C).
* **Privacy statement.** Neighbouring inputs differ by one client's update (``z`` vs 0, so
  L2 sensitivity ``Delta`` on the integer grid). The noise parameter is
  ``s2 = ceil((sigma * Delta)**2) >= (sigma * Delta)**2`` (an integer, ``2**40`` to ``2**42``).
  By CKS Theorem 15, ``d`` independent ``N_Z(0, s2)`` coordinates give
  ``rho``-zCDP with ``sqrt(2 rho) = Delta / sqrt(s2) + 2 sqrt(d) tau``, where
  ``tau = 10 sum_{k>=1} exp(-2 pi^2 s2 k / (k + 1)) < exp(-2**43)``: for any LoRA size ``d``
  that is ``rho = 1 / (2 sigma^2)``, the continuous Gaussian's, up to a term below
  ``2**-(10**12)``. Hence Renyi DP ``alpha / (2 sigma^2)`` per round (Bun & Steinke 2016),
  which is what fedshield.dp.accountant composes and converts. (Draws with ``|noise| >= 2**40``
  are redrawn, which moves the distribution by less than ``exp(-2**33)``.)
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Dict, Mapping

import numpy as np
import torch

from .. import native
from ..base.errors import ParameterError

# The grid step is 2**-GRID_BITS to 2**-(GRID_BITS + 1) of the noise's standard deviation.
GRID_BITS = 20
# Below this noise multiplier, Delta = C / gamma would pass 2**62 (int64 values, 128-bit norms).
MIN_NOISE_MULTIPLIER = 2.0 ** -40


def clip_and_noise(update: Mapping[str, torch.Tensor], clip: float, noise_multiplier: float
                   ) -> tuple[Dict[str, torch.Tensor], float]:
    """The update scaled to global L2 norm <= clip, plus discrete Gaussian noise of standard
    deviation noise_multiplier * clip (on a grid 2**-20 of it; see the module docstring).

    Returns (noised update as float32 tensors, norm before clipping). Every call draws fresh
    noise from the OS CSPRNG: nothing in a config or a seed can replay it.
    """
    if not (clip > 0 and math.isfinite(clip)):
        raise ParameterError(f"clip={clip!r} must be a finite number > 0")
    if not (math.isfinite(noise_multiplier) and
            (noise_multiplier == 0 or noise_multiplier >= MIN_NOISE_MULTIPLIER)):
        raise ParameterError(f"noise_multiplier={noise_multiplier!r} must be 0 or a finite "
                             f"number >= 2**-40")
    names = sorted(update)
    tensors = [update[n].detach().to("cpu", torch.float64) for n in names]
    flat = (torch.cat([t.reshape(-1) for t in tensors]).numpy() if tensors
            else np.zeros(0, dtype=np.float64))
    norm = float(np.sqrt(np.dot(flat, flat)))
    if not math.isfinite(norm):
        raise ParameterError("the update to clip holds a value that is not finite")
    factor = min(1.0, clip / norm) if norm > 0 else 1.0
    if noise_multiplier == 0:
        noised = flat * factor
    else:
        noised = _discrete_gaussian_mechanism(flat, factor, clip, noise_multiplier)
    out, at = {}, 0
    for name, t in zip(names, tensors):
        out[name] = torch.from_numpy(noised[at:at + t.numel()].astype(np.float32)).reshape(t.shape)
        at += t.numel()
    return out, norm


def grid_step(clip: float, noise_multiplier: float) -> float:
    """gamma: the power of two with sigma * C / gamma in [2**GRID_BITS, 2**(GRID_BITS + 1))."""
    return math.ldexp(1.0, math.floor(math.log2(noise_multiplier * clip)) - GRID_BITS)


def to_grid(flat: np.ndarray, factor: float, clip: float, noise_multiplier: float
            ) -> tuple[np.ndarray, float, int]:
    """(z, gamma, s2): the update ``flat * factor`` (norm <= clip) as integers on the grid of
    step gamma with ||z||_2 <= Delta = clip / gamma exactly, and the integer variance parameter
    s2 = ceil((noise_multiplier * Delta)**2) of the discrete Gaussian noise it gets."""
    gamma = grid_step(clip, noise_multiplier)
    delta = clip / gamma                        # exact: gamma is a power of two
    delta2 = Fraction(delta) ** 2
    while True:  # rounding to the grid may push the norm past Delta: shrink until it holds
        z = np.rint(flat * (factor / gamma)).astype(np.int64)
        s = native.squared_norm(z)
        if s <= delta2:
            break
        factor *= math.sqrt(float(delta2 / s)) * (1.0 - 2.0 ** -40)
    s2 = math.ceil((Fraction(noise_multiplier) * Fraction(delta)) ** 2)
    return z, gamma, s2


def _discrete_gaussian_mechanism(flat: np.ndarray, factor: float, clip: float,
                                 noise_multiplier: float) -> np.ndarray:
    z, gamma, s2 = to_grid(flat, factor, clip, noise_multiplier)
    native.add_discrete_gaussian(z, s2, 0)
    return z.astype(np.float64) * gamma         # post-processing of the exact integers


__all__ = ["GRID_BITS", "MIN_NOISE_MULTIPLIER", "clip_and_noise", "grid_step", "to_grid"]
