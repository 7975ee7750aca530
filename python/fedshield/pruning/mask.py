"""Importance scoring + pruning of a whole LoRA state in one fused pass, and the masks' uses.

CUDA tensors go to the Triton kernels (fedshield.kernels.importance), anything else to the
multi-threaded native CPU path (fedshield.native.importance_mask). Both give bit-identical
masks: the semantics are pinned by the torch reference in fedshield.kernels.reference.
"""

from __future__ import annotations

import math
import os
from typing import Mapping, NamedTuple

import torch

from .. import native
from ..base.errors import ParameterError
from ..kernels.reference import importance_mask_reference
from ..base.validate import is_real

CRITERIA = ("l1", "delta", "taylor")
SCOPES = ("per_tensor", "global")
BACKENDS = ("native", "triton", "torch")


class ImportanceResult(NamedTuple):
    """What ``importance_mask(..., return_compact=True)`` returns.

    ``values[offsets[i]:offsets[i + 1]]`` are the kept values of the i-th tensor of the state
    (in its iteration order), ``indices`` their positions in the flattened concatenation.
    """

    masks: dict[str, torch.Tensor]   # name -> bool tensor shaped like the state's, True = kept
    values: torch.Tensor             # float32 [n_kept], kept values of ``state`` in flat order
    indices: torch.Tensor            # int64 [n_kept], ascending flat indices of those values
    offsets: torch.Tensor            # int64 [n_tensors + 1], where each tensor starts in values


def importance_mask(state: Mapping[str, torch.Tensor], ratio: float, criterion: str = "l1",
                    scope: str = "per_tensor", *,
                    reference: Mapping[str, torch.Tensor] | None = None,
                    grads: Mapping[str, torch.Tensor] | None = None,
                    return_compact: bool = False, backend: str | None = None,
                    threads: int = 0):
    """Keep-masks that prune the least important fraction ``ratio`` of a LoRA state.

    Args:
        state: name -> tensor (any real dtype; scored in float32). Not modified.
        ratio: the pruned fraction (the paper's p_t), in [0, 1]. ``round(ratio * n)`` values
            are pruned (Python rounding, as torch.nn.utils.prune), n = numel of each tensor
            (``scope="per_tensor"``) or of the whole state (``scope="global"``).
        criterion: ``"l1"`` scores |w| (the paper); ``"delta"`` scores |w - reference| (the
            change against the global state); ``"taylor"`` scores |w * grad|.
        scope: ``"per_tensor"`` (the paper) or ``"global"``: one threshold over all tensors.
        reference: name -> tensor, the global state ``criterion="delta"`` compares against
            (same names and shapes as ``state``; only with ``"delta"``).
        grads: name -> tensor, the gradients ``criterion="taylor"`` needs (same names and
            shapes; only with ``"taylor"``).
        return_compact: also return the kept values and their flat indices (see
            ImportanceResult), so packing needs no second pass over the state.
        backend: None picks "triton" for CUDA tensors and "native" otherwise; "torch" runs the
            reference. "triton" on CPU tensors needs TRITON_INTERPRET=1 (tests do that).
        threads: native CPU threads (0 = all cores).

    Every kept value scores >= every pruned one; among equal scores the lower flat index is
    pruned first, so every backend and every client gets the same mask. The masks of one call
    are views of one flat buffer (clone one before modifying it in place).

    Returns:
        name -> bool tensor (True = kept) on the state's device, or an ImportanceResult.

    Raises:
        ParameterError naming the bad value: ratio outside [0, 1], unknown criterion or scope,
        an empty state or tensor, NaN/Inf in any input, missing or mismatched reference/grads.
    """
    names, flats, others, sizes, device = _prepare(state, ratio, criterion, scope,
                                                   reference, grads)
    total = sum(sizes)
    if scope == "global":
        segment_sizes = [total]
    else:
        segment_sizes = sizes
    n_prune = [int(round(ratio * n)) for n in segment_sizes]
    if backend is None:
        backend = "triton" if device.type == "cuda" else "native"
    other_label = "reference" if criterion == "delta" else "grads"

    if backend == "native":
        if device.type != "cpu":
            raise ParameterError(f"backend='native' needs CPU tensors, got device {device}")
        mask, kept_values, kept_indices = native.importance_mask(
            [f.numpy() for f in flats], [o.numpy() for o in others], CRITERIA.index(criterion),
            n_prune, scope == "global", return_compact, names, other_label, threads)
        mask = torch.from_numpy(mask).view(torch.bool)
        kept_values, kept_indices = torch.from_numpy(kept_values), torch.from_numpy(kept_indices)
    elif backend == "triton":
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ParameterError(f"backend='triton' needs CUDA tensors (got device {device}) "
                                 "or TRITON_INTERPRET=1")
        # triton: a GPU dependency, loaded only for CUDA tensors
        from ..kernels.importance import importance_mask as _triton_mask  # noqa: PLC0415

        values = flats[0] if len(flats) == 1 else torch.cat(flats)
        other = None if not others else others[0] if len(others) == 1 else torch.cat(others)
        mask, kept_values, kept_indices, n_bad = _triton_mask(
            values, other, criterion, segment_sizes, n_prune, return_compact)
        if int(n_bad):  # the one host sync
            _check_finite(names, flats, others, other_label)
        mask = mask.view(torch.bool)
    elif backend == "torch":
        _check_finite(names, flats, others, other_label)
        values = torch.cat(flats)
        other = torch.cat(others) if others else None
        mask, kept_values, kept_indices = importance_mask_reference(
            values, other, criterion, segment_sizes, n_prune)
    else:
        raise ParameterError(f"backend={backend!r} is not one of {BACKENDS} (or None)")

    masks = {name: part.view(state[name].shape)
             for name, part in zip(names, torch.split(mask, sizes))}
    if not return_compact:
        return masks
    starts = torch.tensor([0] + sizes, dtype=torch.int64).cumsum(0).to(kept_indices.device)
    offsets = torch.searchsorted(kept_indices, starts)
    return ImportanceResult(masks, kept_values, kept_indices, offsets)


def _prepare(state, ratio, criterion, scope, reference, grads):
    if not is_real(ratio) or not 0.0 <= ratio <= 1.0:
        raise ParameterError(f"ratio={ratio!r} must be a number in [0, 1]")
    if criterion not in CRITERIA:
        raise ParameterError(f"criterion={criterion!r} must be one of {CRITERIA}")
    if scope not in SCOPES:
        raise ParameterError(f"scope={scope!r} must be one of {SCOPES}")
    if not isinstance(state, Mapping) or not state:
        raise ParameterError("state is empty: expected a non-empty mapping name -> tensor")
    needed = {"l1": None, "delta": "reference", "taylor": "grads"}[criterion]
    for label, given in (("reference", reference), ("grads", grads)):
        if given is not None and label != needed:
            raise ParameterError(f"{label}= is only used by criterion="
                                 f"{'delta' if label == 'reference' else 'taylor'!r}, "
                                 f"not criterion={criterion!r}")
    other_state = reference if criterion == "delta" else grads
    if needed and other_state is None:
        raise ParameterError(f"criterion={criterion!r} needs {needed}=: name -> tensor")

    names, flats, others, sizes = [], [], [], []
    device = None
    for name, tensor in state.items():
        _check_tensor("state", name, tensor)
        if tensor.numel() == 0:
            raise ParameterError(f"state[{name!r}] is empty (shape {tuple(tensor.shape)})")
        if device is None:
            device = tensor.device
        elif tensor.device != device:
            raise ParameterError(f"state[{name!r}] is on {tensor.device}, the first tensor "
                                 f"on {device}: every tensor must share one device")
        names.append(name)
        sizes.append(tensor.numel())
        flats.append(_flat32(tensor))
        if needed:
            if name not in other_state:
                raise ParameterError(f"{needed}[{name!r}] is missing")
            o = other_state[name]
            _check_tensor(needed, name, o)
            if tuple(o.shape) != tuple(tensor.shape):
                raise ParameterError(f"{needed}[{name!r}] has shape {tuple(o.shape)}, "
                                     f"state[{name!r}] has shape {tuple(tensor.shape)}")
            if o.device != device:
                raise ParameterError(f"{needed}[{name!r}] is on {o.device}, the state on {device}")
            others.append(_flat32(o))
    if needed:
        extra = [n for n in other_state if n not in state]
        if extra:
            raise ParameterError(f"{needed} has tensors the state lacks: {extra[:3]}")
    return names, flats, others, sizes, device


def _check_tensor(label: str, name: str, tensor) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise ParameterError(f"{label}[{name!r}] is a {type(tensor).__name__}, expected a tensor")
    if tensor.is_complex() or tensor.dtype == torch.bool:
        raise ParameterError(f"{label}[{name!r}] has dtype {tensor.dtype}, expected a real dtype")


def _flat32(tensor: torch.Tensor) -> torch.Tensor:
    flat = tensor.detach().reshape(-1)  # a view unless the tensor is not contiguous
    return flat if flat.dtype == torch.float32 else flat.float()


def _check_finite(names, flats, others, other_label) -> None:
    for label, tensors in (("state", flats), (other_label, others)):
        for name, t in zip(names, tensors):
            bad = torch.nonzero(~torch.isfinite(t))
            if bad.numel():
                i = int(bad[0])
                raise ParameterError(f"{label}[{name!r}] contains NaN or Inf "
                                     f"({float(t[i])} at index {i} of the flattened tensor)")


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
