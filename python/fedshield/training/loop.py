"""Local client training and evaluation for LoRA fine-tuning."""

from __future__ import annotations

import logging
import math
from typing import Callable, Dict, Mapping, Optional

import torch
import torch.nn.functional as F

from .base_model import seeded_rng
from ..base.validate import is_int
logger = logging.getLogger("fedshield")

IGNORE_INDEX = -100
_KEYS = ("input_ids", "attention_mask", "labels")


def _as_tensors(data) -> Dict[str, torch.Tensor]:
    """Accept a dict of batch-first tensors or anything with ``.tensors`` (InstructionDataset)."""
    tensors = getattr(data, "tensors", data)
    if not isinstance(tensors, Mapping):
        raise ValueError(
            f"expected a mapping of tensors or an InstructionDataset, got {type(data).__name__}"
        )
    missing = [k for k in _KEYS if k not in tensors]
    if missing:
        raise ValueError(f"training data is missing keys {missing}")
    n = tensors["input_ids"].shape[0]
    if n == 0:
        raise ValueError("training data has 0 examples")
    shapes = {k: tuple(tensors[k].shape) for k in _KEYS}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"input_ids/attention_mask/labels shapes differ: {shapes}")
    if not (tensors["labels"] != IGNORE_INDEX).any():
        raise ValueError("all labels are -100; there are no completion tokens to learn")
    return {k: tensors[k] for k in _KEYS}


def _batch(tensors: Dict[str, torch.Tensor], idx: torch.Tensor, device) -> Dict[str, torch.Tensor]:
    b = {k: v[idx] for k, v in tensors.items()}
    # Right padding: cut columns past the longest row to save compute.
    width = int(b["attention_mask"].sum(dim=1).max())
    return {k: v[:, :width].to(device) for k, v in b.items()}


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


def train_local(
    peft_model,
    tensors,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    grad_accum: int = 1,
    progress: Optional[Callable[[int, float], None]] = None,
    max_grad_norm: Optional[float] = 1.0,
) -> Dict[str, float]:
    """Run exactly ``steps`` AdamW optimiser steps on the trainable parameters.

    Minibatches are drawn without replacement from a seeded permutation,
    reshuffled each time the data is exhausted (so small client sets cycle).
    Sampling uses a private ``torch.Generator``; dropout needs the global
    RNG, so it runs inside :func:`fedshield.training.base_model.seeded_rng` -- training is
    reproducible and the caller's RNG state is unchanged afterwards.

    A fresh optimiser is built per call: in FL each round starts from the
    aggregated adapter, and stale Adam moments from another round would leak
    the client's previous trajectory into this one.

    Returns ``loss`` (mean over steps of the per-step training loss),
    ``num_examples`` (dataset size, the usual FedAvg weight),
    ``examples_seen`` and ``steps``. ``progress(step, loss)`` is called after
    every optimiser step (1-based). ``max_grad_norm`` clips the global grad
    norm (None disables); it keeps the high demo learning rates stable.
    """
    for name, value in (("steps", steps), ("batch_size", batch_size), ("grad_accum", grad_accum)):
        if not is_int(value) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    if max_grad_norm is not None and not max_grad_norm > 0:
        raise ValueError(f"max_grad_norm must be > 0 or None, got {max_grad_norm!r}")
    data = _as_tensors(tensors)
    n = data["input_ids"].shape[0]

    params = [p for p in peft_model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters (was LoRA attached?)")
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    device = _device_of(peft_model)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=gen)
    pos = 0

    def next_indices() -> torch.Tensor:
        nonlocal order, pos
        picked = []
        need = min(batch_size, n)  # a batch never repeats an example
        while need:
            if pos >= n:
                order, pos = torch.randperm(n, generator=gen), 0
            take = order[pos : pos + need]
            picked.append(take)
            pos += take.numel()
            need -= take.numel()
        return torch.cat(picked)

    was_training = peft_model.training
    peft_model.train()
    step_losses = []
    seen = 0
    try:
        with seeded_rng(seed):  # fixes dropout masks
            for step in range(1, steps + 1):
                optimizer.zero_grad(set_to_none=True)
                total = 0.0
                for _ in range(grad_accum):
                    batch = _batch(data, next_indices(), device)
                    out = peft_model(**batch)
                    (out.loss / grad_accum).backward()
                    total += float(out.loss.detach())
                    seen += batch["input_ids"].shape[0]
                if max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
                optimizer.step()
                loss = total / grad_accum
                if not math.isfinite(loss):
                    raise FloatingPointError(f"training loss became {loss} at step {step}")
                step_losses.append(loss)
                if progress is not None:
                    progress(step, loss)
    finally:
        peft_model.train(was_training)

    mean_loss = sum(step_losses) / len(step_losses)
    logger.debug("train_local: %d steps, mean loss %.4f, %d examples seen", steps, mean_loss, seen)
    return {"loss": mean_loss, "num_examples": int(n), "examples_seen": int(seen), "steps": steps}


def evaluate_loss(peft_model, tensors, batch_size: int = 32) -> float:
    """Mean cross-entropy per completion token over the whole set.

    Summed over all unmasked tokens then divided once, so batches with
    longer answers weigh proportionally (unlike averaging batch means).
    """
    if not is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    data = _as_tensors(tensors)
    n = data["input_ids"].shape[0]
    device = _device_of(peft_model)
    was_training = peft_model.training
    peft_model.eval()
    total_loss, total_tokens = 0.0, 0
    try:
        with torch.no_grad():
            for start in range(0, n, batch_size):
                batch = _batch(data, torch.arange(start, min(start + batch_size, n)), device)
                logits = peft_model(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
                ).logits
                # Causal shift: position t predicts token t+1.
                shift_logits = logits[:, :-1].float()
                shift_labels = batch["labels"][:, 1:]
                total_loss += float(
                    F.cross_entropy(
                        shift_logits.reshape(-1, shift_logits.shape[-1]),
                        shift_labels.reshape(-1),
                        ignore_index=IGNORE_INDEX,
                        reduction="sum",
                    )
                )
                total_tokens += int((shift_labels != IGNORE_INDEX).sum())
    finally:
        peft_model.train(was_training)
    if total_tokens == 0:
        raise ValueError("no completion tokens to evaluate (labels all -100 after shift)")
    return total_loss / total_tokens
