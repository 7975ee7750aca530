"""The run record: metrics.json, written by one writer for every engine.

A :class:`RoundRecord` per round and one :class:`RunRecord` for the run. The Server fills
them (both engines drive the same Server); the plots, the report and resume read the dict.
Every key of metrics.json is a declared field here: an engine records a fact through a field,
never through a free-form dict, and a record with a key this version does not write is refused.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TypedDict

from ..base.atomic import write_json_atomic
from ..base.errors import ParameterError
from ..training.metrics import perplexity, weighted_loss
from .messages import PHASES, SiteInfo, TrainReply


class _ExclusionBase(TypedDict):
    round: int
    stage: str                     # join | train | share | evaluate | catch-up
    node: int | None
    party: int | None
    reason: str


class Exclusion(_ExclusionBase, total=False):
    """One exclusion as metrics.json lists it (``events``, and the round's ``excluded``)."""

    dropped: bool                  # the node also left the run


@dataclass(frozen=True)
class KeyEpoch:
    """A key set-up (or rotation) and the round it came before."""

    epoch: int
    before_round: int
    seconds: float
    subsets_checked: int
    context_fp: str
    message_steps: int = 0         # the set-up's message steps (each a round trip)


@dataclass(frozen=True)
class CatchUp:
    """A party brought to the current global adapter by another one (``source``)."""

    before_round: int
    party: int
    source: int
    version: int

    def to_dict(self) -> dict:
        return {"before_round": self.before_round, "party": self.party, "from": self.source,
                "version": self.version}

    @classmethod
    def from_dict(cls, d: dict) -> "CatchUp":
        return cls(before_round=d["before_round"], party=d["party"], source=d["from"],
                   version=d["version"])


@dataclass(frozen=True)
class RoundsChange:
    """A resumed run whose total of rounds was changed (the schedules follow the new one)."""

    after_round: int
    rounds: int
    was: int


@dataclass(frozen=True)
class Resumption:
    """A Flower run resumed after ``after_round`` with these parties."""

    after_round: int
    parties: list[int]


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
    excluded: list[Exclusion] = field(default_factory=list)
    wall_seconds: float = 0.0
    samples: list[dict] | None = None              # local engine: the global model's answers
    update_norm: list[float] | None = None         # DP: each client's norm before clipping
    train_metrics: list[dict] | None = None        # sites' own training (train-fn): per client
    dp_epsilon: float | None = None

    def take_contributions(self, replies: list[TrainReply], bytes_down: int) -> None:
        """The aggregated replies (in party order) and the aggregate's size."""
        self.clients = [r.party for r in replies]
        self.train_loss = [r.train_loss for r in replies]
        self.bytes_up = [r.nbytes for r in replies]
        self.bytes_down = bytes_down
        self.kept_fraction = sum(r.kept_fraction for r in replies) / len(replies)
        for phase in ("train", "prune", "encrypt"):
            self.seconds[phase] += sum(r.seconds.get(phase, 0.0) for r in replies)
        if any(r.update_norm is not None for r in replies):
            self.update_norm = [r.update_norm for r in replies]
        if any(r.metrics for r in replies):
            self.train_metrics = [dict(r.metrics or {}) for r in replies]
        self.decrypting_clients = list(self.clients)

    def take_evaluation(self, losses: dict[int, float], examples: dict[int, int],
                        n_sites: int, applied: bool) -> None:
        """The held-out losses party -> loss (of ``examples``) after the aggregate was applied
        (``applied``: by at least one participant, else the round failed)."""
        self.site_eval_loss = [losses.get(p) for p in range(n_sites)]
        self.eval_loss = weighted_loss(losses, examples)
        self.perplexity = None if self.eval_loss is None else perplexity(self.eval_loss)
        if applied:
            self.status = "ok"
        else:
            self.failure = "no participant applied the aggregate"

    def to_dict(self) -> dict:
        out = asdict(self)
        out["seconds"] = {k: round(float(v), 4) for k, v in self.seconds.items()}
        for optional in ("failure", "samples", "update_norm", "train_metrics", "dp_epsilon"):
            if out[optional] is None:
                del out[optional]
        return out


# metrics.json keys written only once the run has the fact (an absent key: not known)
_OPTIONAL = ("ckks_params", "identities", "server_identity", "participants", "failure",
             "failure_kind", "not_enrolled", "server_loaded_openfhe", "server_loaded_torch", "dp",
             "message_steps")
_LISTS = {"key_epochs": KeyEpoch, "rounds_changed": RoundsChange, "resumed": Resumption}


@dataclass
class RunRecord:
    """metrics.json: the config, the sites, the rounds, every exclusion and what each engine
    records of the run (key epochs, catch-ups, resumes)."""

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
    events: list[Exclusion] = field(default_factory=list)
    dp: dict | None = None
    finished: bool = False
    ckks_params: dict | None = None                # what the keys resolved to
    identities: dict[str, str] | None = None       # party -> identity fingerprint (HE)
    server_identity: str | None = None             # the server's identity fingerprint (HE)
    key_epochs: list[KeyEpoch] = field(default_factory=list)
    catch_ups: list[CatchUp] = field(default_factory=list)
    rounds_changed: list[RoundsChange] = field(default_factory=list)
    resumed: list[Resumption] = field(default_factory=list)
    participants: list[int] | None = None          # Flower: the parties enrolled
    failure: str | None = None                     # Flower: why the run stopped
    failure_kind: str | None = None                # Flower: its kind (fedshield.run.outcome)
    not_enrolled: list[int] | None = None          # Flower: nodes that connected too late
    server_loaded_openfhe: bool | None = None      # Flower: what the server process loaded
    server_loaded_torch: bool | None = None
    message_steps: dict[str, int] | None = None    # message steps per stage: join, keys, rounds

    def take_sites(self, sites: dict[int, SiteInfo], n_sites: int) -> None:
        """The enrolled sites and the held-out loss of the initial global state."""
        losses = {p: s.eval_loss for p, s in sites.items() if s.eval_loss is not None}
        examples = {p: s.eval_examples for p, s in sites.items()}
        self.sites = [sites[p] for p in sorted(sites)]
        self.initial_eval_loss = weighted_loss(losses, examples)
        self.initial_site_eval_loss = [losses.get(p) for p in range(n_sites)]

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
            "finished": self.finished,
        }
        for name in _OPTIONAL:
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        for name in _LISTS:
            if getattr(self, name):
                out[name] = [asdict(e) for e in getattr(self, name)]
        if self.catch_ups:
            out["catch_ups"] = [c.to_dict() for c in self.catch_ups]
        return out

    def write(self, path: str | Path) -> None:
        write_json_atomic(path, self.to_dict())

    @classmethod
    def from_dict(cls, d: dict) -> "RunRecord":
        """The record of a checkpointed run (resume continues it). ParameterError for a key
        this version does not write (a record of another version, or edited)."""
        known = {f.name for f in fields(cls)} | {"initial_perplexity"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ParameterError(f"the run record holds {unknown}, keys this fedshield version "
                                 "does not write")
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
                   **{name: d.get(name) for name in _OPTIONAL if name != "dp"},
                   **{name: [kind(**e) for e in d.get(name, [])]
                      for name, kind in _LISTS.items()},
                   catch_ups=[CatchUp.from_dict(c) for c in d.get("catch_ups", [])])
