"""Torch reference of fused importance scoring and pruning (the one copy tests and benchmarks use).

Semantics every backend (native CPU, Triton) must reproduce bit for bit:

* scores are float32: ``l1`` = |w|, ``delta`` = |w - reference|, ``taylor`` = |w * grad|;
* the values live in one flat buffer cut into segments (one per tensor, or one for all of them);
* in a segment of n values with k to prune, the k smallest scores are pruned, ties broken by
  position (the lower flat index is pruned first), i.e. the first k of a stable ascending sort;
* compaction lists the kept values of ``values`` and their flat indices in ascending index order.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

CRITERIA = ("l1", "delta", "taylor")


def importance_scores(values: torch.Tensor, other: torch.Tensor | None = None,
                      criterion: str = "l1") -> torch.Tensor:
    """float32 importance scores of ``values`` (``other`` = the reference or the gradients)."""
    x = values.float()
    if criterion == "l1":
        return x.abs()
    if other is None:
        raise ValueError(f"criterion={criterion!r} needs a second tensor")
    y = other.float()
    if criterion == "delta":
        return (x - y).abs()
    if criterion == "taylor":
        return (x * y).abs()
    raise ValueError(f"criterion={criterion!r} is not one of {CRITERIA}")


def prune_keep_mask(scores: torch.Tensor, segment_sizes: Sequence[int],
                    n_prune: Sequence[int]) -> torch.Tensor:
    """Flat bool keep-mask: per segment, the first n_prune[s] of a stable ascending sort go."""
    keep = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    start = 0
    for size, k in zip(segment_sizes, n_prune):
        if k:
            order = torch.sort(scores[start:start + size], stable=True).indices
            keep[start + order[:k]] = False
        start += size
    return keep


def importance_mask_reference(values: torch.Tensor, other: torch.Tensor | None, criterion: str,
                              segment_sizes: Sequence[int], n_prune: Sequence[int]
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(keep mask, kept values as float32, their int64 flat indices) of a flat buffer."""
    values = values.reshape(-1)
    keep = prune_keep_mask(importance_scores(values, other, criterion), segment_sizes, n_prune)
    indices = torch.nonzero(keep).reshape(-1)
    return keep, values.float()[indices], indices


def l1_unstructured_masks(state: Mapping[str, torch.Tensor], ratio: float
                          ) -> dict[str, torch.Tensor]:
    """The paper's baseline: ``torch.nn.utils.prune.l1_unstructured`` applied tensor by tensor.

    Each tensor is wrapped as the ``weight`` of a throw-away module, as the reference code does
    with its LoRA layers; the mask torch.nn.utils.prune attaches is returned as a bool tensor.
    """
    from torch.nn.utils import prune

    masks = {}
    for name, tensor in state.items():
        holder = torch.nn.Module()
        holder.weight = torch.nn.Parameter(tensor.detach(), requires_grad=False)
        prune.l1_unstructured(holder, "weight", amount=ratio)
        masks[name] = holder.weight_mask.bool()
    return masks
