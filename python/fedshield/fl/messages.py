"""The typed messages of one round: what the Server plans, what a Party replies, what a site
reports after applying the aggregate. Each has one flat, scalar form (``to_fields`` /
``from_fields``) that any transport carries: the local engine passes the objects, the Flower
engine puts the fields in ConfigRecords and MetricRecords.

``from_fields`` validates everything that came from elsewhere and raises InvalidMessage (a
fs.FedShieldError) naming the bad field, so a malformed, NaN or infinite value from one site
excludes that reply instead of aborting the round.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping

from ..base.errors import FedShieldError

PHASES = ("train", "prune", "encrypt", "aggregate", "decrypt")
SITE_PHASES = ("train", "prune", "encrypt")
PRUNE_MODES = ("local", "global", "off")
METRIC_PREFIX = "metric."     # a site's own training metrics in TrainReply fields


class InvalidMessage(FedShieldError, ValueError):
    """A round message with a missing, malformed or non-finite field."""


def _get(fields: Mapping, name: str):
    try:
        return fields[name]
    except (KeyError, TypeError) as exc:
        raise InvalidMessage(f"missing field {name!r}") from exc


def _int(fields: Mapping, name: str, low: int = 0) -> int:
    value = _get(fields, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise InvalidMessage(f"{name}={value!r} is not an int >= {low}")
    return value


def _float(fields: Mapping, name: str, low: float = -math.inf, high: float = math.inf) -> float:
    value = _get(fields, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidMessage(f"{name}={value!r} is not a number")
    value = float(value)
    if not (math.isfinite(value) and low <= value <= high):
        raise InvalidMessage(f"{name}={value!r} is not a finite number in [{low}, {high}]")
    return value


def _optional(fields: Mapping, name: str) -> float | None:
    """A loss a site may keep to itself (its metrics policy): absent is None."""
    if isinstance(fields, Mapping) and name not in fields:
        return None
    return _float(fields, name, 0.0)


def _str(fields: Mapping, name: str) -> str:
    value = _get(fields, name)
    if not isinstance(value, str):
        raise InvalidMessage(f"{name}={value!r} is not a string")
    return value


@dataclass(frozen=True)
class RoundPlan:
    """What every party of round ``round`` must agree on before it trains."""

    round: int
    lr: float
    prune: str                    # local | global | off
    prune_ratio: float            # pruned fraction this round (0 when prune is off)
    weight_bound: float           # public bound on any party's weight (it cancels out)
    base_version: int             # the last round whose aggregate the global state includes

    @property
    def global_mask(self) -> bool:
        """Every party masks with importance_mask(global state, prune_ratio); round 1 sends
        everything (LoRA B starts at zero: no magnitudes to rank yet)."""
        return self.prune == "global" and self.round > 1

    def to_fields(self) -> dict:
        return {"round": self.round, "lr": self.lr, "prune": self.prune,
                "prune-ratio": self.prune_ratio, "weight-bound": self.weight_bound,
                "base-version": self.base_version}

    @classmethod
    def from_fields(cls, fields: Mapping) -> "RoundPlan":
        prune = _str(fields, "prune")
        if prune not in PRUNE_MODES:
            raise InvalidMessage(f"prune={prune!r} is not one of {PRUNE_MODES}")
        return cls(round=_int(fields, "round", 1), lr=_float(fields, "lr", 0.0),
                   prune=prune, prune_ratio=_float(fields, "prune-ratio", 0.0, 1.0),
                   weight_bound=_float(fields, "weight-bound", 1.0),
                   base_version=_int(fields, "base-version"))


@dataclass(frozen=True)
class SiteInfo:
    """A site as it enrols: who it is and how much data it holds (its weight)."""

    party: int                    # party id (threshold: the key share's; shared: its index)
    name: str
    data: str                     # its data file, as the site names it
    train_examples: int
    eval_examples: int
    eval_loss: float | None       # held-out loss of the initial (global) adapter (None: the
                                  # site's metrics policy keeps it)
    context_fp: str = ""          # hex fingerprint of its key's context ("" without HE, or
                                  # before the key set-up made its key)
    num_lora_values: int = 0
    identity: str = ""            # hex of its PublicIdentity ("" without HE)

    def to_fields(self) -> dict:
        out = {"party": self.party, "name": self.name, "data": self.data,
               "train-examples": self.train_examples, "eval-examples": self.eval_examples,
               "context-fp": self.context_fp, "num-lora-values": self.num_lora_values,
               "identity": self.identity}
        if self.eval_loss is not None:
            out["eval-loss"] = self.eval_loss
        return out

    @classmethod
    def from_fields(cls, fields: Mapping) -> "SiteInfo":
        return cls(party=_int(fields, "party"), name=_str(fields, "name"),
                   data=_str(fields, "data"), train_examples=_int(fields, "train-examples", 1),
                   eval_examples=_int(fields, "eval-examples", 1),
                   eval_loss=_optional(fields, "eval-loss"),
                   context_fp=_str(fields, "context-fp"),
                   num_lora_values=_int(fields, "num-lora-values"),
                   identity=_str(fields, "identity") if "identity" in fields else "")

    def summary(self) -> dict:
        """Its entry in metrics.json's ``sites``."""
        return {"name": self.name, "data": self.data, "train_examples": self.train_examples,
                "eval_examples": self.eval_examples}


@dataclass(frozen=True)
class TrainReply:
    """One party's contribution to a round: its encrypted update (or, without HE, its update
    values and weight) and what it measured."""

    party: int
    round: int
    train_loss: float | None        # None: the site's metrics policy keeps it
    kept_fraction: float
    seconds: dict = field(default_factory=dict)     # train, prune, encrypt
    update: bytes | None = None                     # EncryptedUpdate wire bytes
    values: dict | None = None                      # plaintext baseline: name -> numpy array
    weight: float | None = None                     # plaintext baseline only
    update_norm: float | None = None                # DP: L2 norm before clipping
    metrics: dict | None = None                     # a site's own training: name -> number
    signature: bytes | None = None                  # the party's signed record of `update`

    @property
    def nbytes(self) -> int:
        """Bytes this party sends: the update, or 4 per dense fp32 value without HE."""
        if self.update is not None:
            return len(self.update)
        return 4 * sum(int(v.size) for v in (self.values or {}).values())

    def to_fields(self) -> dict:
        out = {"party": self.party, "round": self.round, "kept": self.kept_fraction,
               **{f"seconds-{k}": float(self.seconds[k]) for k in SITE_PHASES
                  if k in self.seconds}}
        if self.train_loss is not None:
            out["train-loss"] = self.train_loss
        if self.update_norm is not None:
            out["update-norm"] = self.update_norm
        for name, value in (self.metrics or {}).items():
            out[METRIC_PREFIX + name] = value
        return out

    @classmethod
    def from_fields(cls, fields: Mapping, update: bytes,
                    signature: bytes | None = None) -> "TrainReply":
        norm = fields.get("update-norm") if isinstance(fields, Mapping) else None
        metrics = {k[len(METRIC_PREFIX):]: _float(fields, k) for k in fields
                   if isinstance(k, str) and k.startswith(METRIC_PREFIX)}
        return cls(party=_int(fields, "party"), round=_int(fields, "round", 1),
                   train_loss=_optional(fields, "train-loss"),
                   kept_fraction=_float(fields, "kept", 0.0, 1.0),
                   seconds={k: _float(fields, f"seconds-{k}", 0.0) for k in SITE_PHASES
                            if isinstance(fields, Mapping) and f"seconds-{k}" in fields},
                   update=update,
                   update_norm=None if norm is None else _float(fields, "update-norm", 0.0),
                   metrics=metrics or None, signature=signature)


@dataclass(frozen=True)
class EvalReply:
    """A party after applying round ``version``'s aggregate: its held-out loss."""

    party: int
    version: int
    eval_loss: float | None       # None: the site's metrics policy keeps it
    eval_examples: int
    seconds_decrypt: float = 0.0
    budget_left: int = -1         # ciphertexts its key may still decrypt (-1: not counted)
    adapter_fp: str = ""          # fingerprint of the global adapter it now holds

    def to_fields(self) -> dict:
        out = {"party": self.party, "version": self.version,
               "eval-examples": self.eval_examples, "seconds-decrypt": self.seconds_decrypt,
               "budget-left": self.budget_left, "adapter-fp": self.adapter_fp}
        if self.eval_loss is not None:
            out["eval-loss"] = self.eval_loss
        return out

    @classmethod
    def from_fields(cls, fields: Mapping) -> "EvalReply":
        return cls(party=_int(fields, "party"), version=_int(fields, "version"),
                   eval_loss=_optional(fields, "eval-loss"),
                   eval_examples=_int(fields, "eval-examples", 1),
                   seconds_decrypt=(_float(fields, "seconds-decrypt", 0.0)
                                    if "seconds-decrypt" in fields else 0.0),
                   budget_left=(_int(fields, "budget-left", -1) if "budget-left" in fields
                                else -1),
                   adapter_fp=_str(fields, "adapter-fp") if "adapter-fp" in fields else "")


@dataclass(frozen=True)
class ShareReply:
    """A threshold party's partial decryption of the round's aggregate (its bytes are screened
    by the Server) and how long making it took."""

    share: bytes
    seconds: float = 0.0
    signature: bytes = b""        # the party's signed record of `share`

    def to_fields(self) -> dict:
        return {"seconds": self.seconds}

    @classmethod
    def from_fields(cls, fields: Mapping, share: bytes, signature=None) -> "ShareReply":
        if not isinstance(signature, bytes):
            raise InvalidMessage("the share comes without its signed record")
        seconds = _float(fields, "seconds", 0.0) if "seconds" in fields else 0.0  # a site
        return cls(share=share, seconds=seconds, signature=signature)    # may keep its timings
