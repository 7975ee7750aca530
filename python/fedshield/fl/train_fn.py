"""A site's own training function: ``train_fn = "package.module:function"`` in its site config
(fedshield.fl.site_config; never the server's run config) replaces fedshield's training loop
with the site's own.

Each round the site worker calls ``function(model, plan)`` with the site's peft model (its LoRA
weights are the global adapter when it is called) and a :class:`TrainPlan`; the function
trains in place, any way it likes (a ``transformers.Trainer``, accelerate, a plain loop: see
fedshield.training.hf_trainer for a callback that stops a Trainer after the round's steps), and returns
``(num_examples, metrics)``: the example count it trained on (its FedAvg weight) and a dict of
numbers that includes ``loss`` (its training loss). fedshield then computes, prunes and
encrypts the update as for its own loop.

Whatever the function raises or returns stays on the site: the worker logs it in the site's
own log, and the server learns only that the site's training function failed
(:class:`TrainFnError`, a fixed message). Nothing here puts a plan, a result or training rows
into an error message.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from ..base.errors import FedShieldError, ParameterError
from ..base.validate import is_int

SETTING = "train_fn"


class TrainFnError(FedShieldError):
    """The site's own training function raised, or returned something that is not
    ``(num_examples, metrics)``."""


@dataclass(frozen=True)
class TrainPlan:
    """What a site's own training function gets each round."""

    round: int
    lr: float                    # the round's learning rate (the run's cosine schedule)
    steps: int                   # optimizer steps this round (training.local_steps)
    batch_size: int
    grad_accum: int
    seed: int                    # a seed for this site and round
    # what the site holds: never in a repr (a repr ends up in logs and error messages)
    tokenizer: Any = field(default=None, repr=False)
    train: Mapping | None = field(default=None, repr=False)  # the site's data file, tokenized:
                                     # input_ids, attention_mask, labels (tensors); a function
                                     # may read its own data instead
    site_config: Mapping = field(default_factory=dict, repr=False)  # this site's own config


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
    """Calls a site's training function and checks what it returns; TrainFnError (chained to
    the function's own exception, for the site's log) when it fails."""
    name = getattr(fn, "__qualname__", type(fn).__name__)
    try:
        result = fn(model, plan)
    except Exception as exc:
        raise TrainFnError(f"{SETTING} {name} raised {type(exc).__name__}") from exc
    if not (isinstance(result, tuple) and len(result) == 2):
        raise TrainFnError(f"{SETTING} {name} returned a {type(result).__name__}; expected "
                           "(num_examples, metrics)")
    n, metrics = result
    if not is_int(n) or n < 1:
        raise TrainFnError(f"{SETTING} {name} returned num_examples={_brief(n)}; expected an "
                           "int >= 1")
    if not isinstance(metrics, Mapping):
        raise TrainFnError(f"{SETTING} {name} returned metrics of type "
                           f"{type(metrics).__name__}; expected a dict")
    out = {}
    for key, value in metrics.items():
        try:
            value = float(value)
        except (TypeError, ValueError):
            value = math.nan
        if not (isinstance(key, str) and key and math.isfinite(value)):
            raise TrainFnError(f"{SETTING} {name} returned metric {_brief(key)}="
                               f"{_brief(metrics[key])}; metrics are finite numbers under "
                               "string names")
        out[key] = value
    if "loss" not in out or out["loss"] < 0:
        raise TrainFnError(f"{SETTING} {name} returned metrics without a training 'loss' "
                           f"(>= 0): {sorted(out)}")
    return n, out


def _brief(value) -> str:
    """A number or short name as it is; anything else by its type (no reprs of objects that
    may hold a site's data)."""
    if isinstance(value, (int, float)) or (isinstance(value, str) and len(value) <= 40):
        return repr(value)
    return f"<{type(value).__name__}>"
