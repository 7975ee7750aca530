"""A site's own training function: ``train-fn = "package.module:function"`` in its node config
(or the run config) replaces fedshield's training loop with the site's own.

Each round the site worker calls ``function(model, plan)`` with the site's peft model (its LoRA
weights are the global adapter when it is called) and a :class:`TrainPlan`; the function
trains in place, any way it likes (a ``transformers.Trainer``, accelerate, a plain loop: see
fedshield.hf_trainer for a callback that stops a Trainer after the round's steps), and returns
``(num_examples, metrics)``: the example count it trained on (its FedAvg weight) and a dict of
numbers that includes ``loss`` (its training loss). fedshield then computes, prunes and
encrypts the update as for its own loop.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from ..errors import ParameterError

SETTING = "train-fn"


@dataclass(frozen=True)
class TrainPlan:
    """What a site's own training function gets each round."""

    round: int
    lr: float                    # the round's learning rate (the run's cosine schedule)
    steps: int                   # optimizer steps this round (training.local_steps)
    batch_size: int
    grad_accum: int
    seed: int                    # a seed for this site and round
    tokenizer: Any = None
    train: Mapping | None = None     # the site's data file, tokenized: input_ids, attention_mask,
                                     # labels (tensors); a function may read its own data instead
    node_config: Mapping = field(default_factory=dict)   # this site's node config


def load_train_fn(spec: str) -> Callable:
    """The function ``spec`` ("package.module:function") names, imported."""
    module_name, sep, attr = str(spec).partition(":")
    if not (sep and module_name and attr):
        raise ParameterError(f"{SETTING}={spec!r} must be 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ParameterError(f"{SETTING}={spec!r}: cannot import {module_name!r} ({exc}); put "
                             "its package on the site worker's PYTHONPATH") from exc
    fn = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise ParameterError(f"{SETTING}={spec!r}: {module_name!r} has no {attr!r}")
    if not callable(fn):
        raise ParameterError(f"{SETTING}={spec!r} names a {type(fn).__name__}, not a function")
    return fn


def run_train_fn(fn: Callable, model, plan: TrainPlan) -> tuple[int, dict[str, float]]:
    """Calls a site's training function and checks what it returns."""
    result = fn(model, plan)
    name = getattr(fn, "__qualname__", repr(fn))
    if not (isinstance(result, tuple) and len(result) == 2):
        raise ParameterError(f"{SETTING} {name} returned {result!r}; expected "
                             "(num_examples, metrics)")
    n, metrics = result
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ParameterError(f"{SETTING} {name} returned num_examples={n!r}; expected an "
                             "int >= 1")
    if not isinstance(metrics, Mapping):
        raise ParameterError(f"{SETTING} {name} returned metrics={metrics!r}; expected a dict")
    out = {}
    for key, value in metrics.items():
        try:
            value = float(value)
        except (TypeError, ValueError):
            value = math.nan
        if not (isinstance(key, str) and key and math.isfinite(value)):
            raise ParameterError(f"{SETTING} {name} returned metric {key!r}={metrics[key]!r}; "
                                 "metrics are finite numbers under string names")
        out[key] = value
    if "loss" not in out or out["loss"] < 0:
        raise ParameterError(f"{SETTING} {name} returned metrics without a training 'loss' "
                             f"(>= 0): {sorted(out)}")
    return n, out
