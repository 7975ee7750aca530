"""Pruning of LoRA updates: importance scores, keep-masks and their uses (fedshield.pruning.mask).

The Triton kernels (fedshield.kernels) and the native CPU path compute the masks; this package
is their one caller. The pruned fraction per round (the paper's schedule) is planned by the
Server: fedshield.fl.schedule.prune_ratio.
"""

from .mask import ImportanceResult, apply_mask, importance_mask, kept_fraction, l1_mask

__all__ = ["ImportanceResult", "apply_mask", "importance_mask", "kept_fraction", "l1_mask"]
