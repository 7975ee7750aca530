"""Magnitude pruning of LoRA values (the paper's per-tensor L1) and its schedule."""

from __future__ import annotations

import math
from typing import Mapping

import torch

from .errors import ParameterError
from .importance import importance_mask


def prune_ratio(round_idx: int, p0: float = 0.2, p_target: float = 0.5,
                t_start: int = 1, t_end: int = 10) -> float:
    """The paper's schedule: p_t = p0 + (p_target - p0) * clip((t - t_start)/(t_end - t_start), 0, 1)."""
    for name, p in (("p0", p0), ("p_target", p_target)):
        if not 0.0 <= p <= 1.0:
            raise ParameterError(f"{name}={p!r} must be in [0, 1]")
    if t_end <= t_start:
        raise ParameterError(f"t_end={t_end} must be greater than t_start={t_start}")
    progress = min(max((round_idx - t_start) / (t_end - t_start), 0.0), 1.0)
    return p0 + (p_target - p0) * progress


def l1_mask(state: Mapping[str, torch.Tensor], ratio: float) -> dict[str, torch.Tensor]:
    """Per tensor, prune round(ratio * numel) values of smallest |w| (as torch.nn.utils.prune).

    Ties are broken by position (lower index pruned first), so every caller gets the same mask.
    Returns name -> bool tensor, True = kept. The fused importance_mask(criterion="l1") does it.
    """
    return importance_mask(state, ratio, criterion="l1", scope="per_tensor")


def apply_mask(state: Mapping[str, torch.Tensor],
               mask: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Zeros at pruned positions (new tensors; the input is not modified)."""
    return {name: torch.where(mask[name], t, torch.zeros_like(t)) for name, t in state.items()}


def kept_fraction(mask: Mapping[str, torch.Tensor]) -> float:
    kept = sum(int(m.sum()) for m in mask.values())
    total = sum(m.numel() for m in mask.values())
    return kept / total if total else math.nan
