"""What the Server plans per round: the learning rate and the pruned fraction (pure math)."""

from __future__ import annotations

import math

from ..base.errors import ParameterError
from ..base.validate import is_int


def cosine_lr(round_idx: int, total_rounds: int, lr_max: float, lr_min: float = 0.0) -> float:
    """Cosine decay across FL rounds: ``lr_max`` at round 0, towards ``lr_min``.

    Uses ``round_idx / total_rounds`` (not ``/ (total_rounds - 1)``) so the
    final round still trains at a useful rate instead of exactly ``lr_min``.
    """
    if not is_int(total_rounds) or total_rounds < 1:
        raise ValueError(f"total_rounds must be an int >= 1, got {total_rounds!r}")
    bad_idx = not is_int(round_idx)
    if bad_idx or not 0 <= round_idx < total_rounds:
        raise ValueError(f"round_idx must be an int in [0, {total_rounds}), got {round_idx!r}")
    if not lr_min >= 0:
        raise ValueError(f"lr_min must be >= 0, got {lr_min!r}")
    if not lr_max >= lr_min:
        raise ValueError(f"lr_max ({lr_max!r}) must be >= lr_min ({lr_min!r})")
    return lr_min + 0.5 * (lr_max - lr_min) * (1.0 + math.cos(math.pi * round_idx / total_rounds))


def prune_ratio(round_idx: int, p0: float = 0.2, p_target: float = 0.5,
                t_start: int = 1, t_end: int = 10) -> float:
    """The paper's schedule of the pruned fraction: nothing pruned before round t_start (the
    FedShield-LLM reference code starts pruning at its round 40), then
    p_t = p0 + (p_target - p0) * clip((t - t_start) / (t_end - t_start), 0, 1).
    ``t_end == t_start`` (a run of one round from t_start): the target from t_start on."""
    for name, p in (("p0", p0), ("p_target", p_target)):
        if not 0.0 <= p <= 1.0:
            raise ParameterError(f"{name}={p!r} must be in [0, 1]")
    if t_end < t_start:
        raise ParameterError(f"t_end={t_end} must be at least t_start={t_start}")
    if round_idx < t_start:
        return 0.0
    if t_end == t_start:
        return p_target
    progress = min(max((round_idx - t_start) / (t_end - t_start), 0.0), 1.0)
    return p0 + (p_target - p0) * progress
