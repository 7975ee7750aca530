"""The run record: metrics.json, written by one writer for every engine.

A :class:`RoundRecord` per round and one :class:`RunRecord` for the run. The Server fills
them (both engines drive the same Server); the plots, the report and resume read the dict.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..base.atomic import write_json_atomic
from ..training.metrics import perplexity
from .messages import PHASES, SiteInfo


@dataclass
class RoundRecord:
    """One round as metrics.json shows it. ``train_loss`` and ``bytes_up`` follow ``clients``
    (the parties whose updates were aggregated); ``site_eval_loss`` follows the run's sites."""

    round: int
    status: str = "failed"                         # ok | failed
    failure: str | None = None
    clients: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    bytes_up: list[int] = field(default_factory=list)
    bytes_down: int = 0
    kept_fraction: float | None = None
    prune_ratio: float = 0.0
    lr: float = 0.0
    seconds: dict = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    decrypting_clients: list[int] = field(default_factory=list)
    bytes_partial_decryptions: int = 0
    n_ciphertexts: int = 0                         # of the aggregate (what a key decrypts)
    eval_loss: float | None = None                 # example-weighted mean over the sites
    site_eval_loss: list[float | None] = field(default_factory=list)
    perplexity: float | None = None
    excluded: list[dict] = field(default_factory=list)
    wall_seconds: float = 0.0
    samples: list[dict] | None = None              # local engine: the global model's answers
    update_norm: list[float] | None = None         # DP: each client's norm before clipping
    train_metrics: list[dict] | None = None        # sites' own training (train-fn): per client
    dp_epsilon: float | None = None

    def to_dict(self) -> dict:
        out = asdict(self)
        out["seconds"] = {k: round(float(v), 4) for k, v in self.seconds.items()}
        for optional in ("failure", "samples", "update_norm", "train_metrics", "dp_epsilon"):
            if out[optional] is None:
                del out[optional]
        return out


@dataclass
class RunRecord:
    """metrics.json: the config, the sites, the rounds and every exclusion."""

    config: dict
    engine: str
    sites: list[SiteInfo] = field(default_factory=list)
    num_lora_values: int = 0
    initial_eval_loss: float | None = None
    initial_site_eval_loss: list[float | None] = field(default_factory=list)
    server_has_secret_key: bool | None = None      # None without HE
    flood_bits: int | None = None
    min_clients: int = 0
    rounds: list[RoundRecord] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)
    dp: dict | None = None
    finished: bool = False
    extra: dict = field(default_factory=dict)      # engine facts (e.g. Flower's not_enrolled)

    def to_dict(self) -> dict:
        out = {
            "config": self.config, "engine": self.engine,
            "sites": [s.summary() for s in self.sites],
            "num_lora_values": self.num_lora_values,
            "initial_eval_loss": self.initial_eval_loss,
            "initial_perplexity": (None if self.initial_eval_loss is None
                                   else perplexity(self.initial_eval_loss)),
            "initial_site_eval_loss": self.initial_site_eval_loss,
            "server_has_secret_key": self.server_has_secret_key,
            "flood_bits": self.flood_bits, "min_clients": self.min_clients,
            "rounds": [r.to_dict() for r in self.rounds], "events": self.events,
            "finished": self.finished, **self.extra,
        }
        if self.dp is not None:
            out["dp"] = self.dp
        return out

    def write(self, path: str | Path) -> None:
        write_json_atomic(path, self.to_dict())

    @classmethod
    def from_dict(cls, d: dict) -> "RunRecord":
        """The record of a checkpointed run (resume continues it)."""
        known = {"config", "engine", "sites", "num_lora_values",
                 "initial_eval_loss", "initial_perplexity", "initial_site_eval_loss",
                 "server_has_secret_key", "flood_bits", "min_clients", "rounds", "events",
                 "finished", "dp"}
        sites = [SiteInfo(party=i, name=s["name"], data=s["data"],
                          train_examples=s["train_examples"], eval_examples=s["eval_examples"],
                          eval_loss=math.nan) for i, s in enumerate(d.get("sites", []))]
        rounds = [RoundRecord(**r) for r in d.get("rounds", [])]
        return cls(config=d["config"], engine=d.get("engine", "local"), sites=sites,
                   num_lora_values=d.get("num_lora_values", 0),
                   initial_eval_loss=d.get("initial_eval_loss"),
                   initial_site_eval_loss=d.get("initial_site_eval_loss", []),
                   server_has_secret_key=d.get("server_has_secret_key"),
                   flood_bits=d.get("flood_bits"), min_clients=d.get("min_clients", 0),
                   rounds=rounds, events=d.get("events", []), dp=d.get("dp"),
                   finished=d.get("finished", False),
                   extra={k: v for k, v in d.items() if k not in known})
