"""DP-LoRA's mechanism: per-client clipping and Gaussian noise of an update (torch).

The accounting is in fedshield.dp.accountant.
"""

from __future__ import annotations

import math
import os
from typing import Dict, Mapping

import torch

from ..errors import ParameterError


def clip_and_noise(update: Mapping[str, torch.Tensor], clip: float, noise_multiplier: float,
                   generator: torch.Generator | None = None) -> tuple[Dict[str, torch.Tensor], float]:
    """The update scaled to global L2 norm <= clip, plus N(0, (noise_multiplier*clip)^2) noise.

    Returns (noised update, norm before clipping). Without `generator`, the noise comes from
    a generator seeded by the OS (os.urandom): a seed anyone could read from the run config
    would let them subtract the noise.
    """
    if not (clip > 0 and math.isfinite(clip)):
        raise ParameterError(f"clip={clip!r} must be a finite number > 0")
    if not (noise_multiplier >= 0 and math.isfinite(noise_multiplier)):
        raise ParameterError(f"noise_multiplier={noise_multiplier!r} must be a finite number >= 0")
    if generator is None:
        generator = torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little"))
    norm = math.sqrt(sum(float(v.double().pow(2).sum()) for v in update.values()))
    factor = min(1.0, clip / norm) if norm > 0 else 1.0
    std = noise_multiplier * clip
    noised = {}
    for name in sorted(update):  # a fixed order: the same generator gives the same noise
        value = update[name].float()
        noise = torch.randn(value.shape, generator=generator, dtype=torch.float32) * std
        noised[name] = value * factor + noise
    return noised, norm
