"""Pure functions over held-out losses, shared by evaluation and the run record."""

from __future__ import annotations

import math
from typing import Mapping


def perplexity(loss: float) -> float:
    """exp(mean token cross-entropy); inf rather than an OverflowError for a diverged model."""
    return math.exp(loss) if loss < 700 else math.inf


def weighted_loss(losses: Mapping[int, float], examples: Mapping[int, int]) -> float | None:
    """Example-weighted mean of the sites' held-out losses (None when no site reported)."""
    total = sum(examples[p] for p in losses)
    if not losses or total <= 0:
        return None
    return sum(losses[p] * examples[p] for p in losses) / total
