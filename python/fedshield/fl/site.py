"""Site: one organisation of the federation with fedshield's own training loop.

A site holds its own data file (and nothing of anyone else's), a model with LoRA, and a
:class:`Party` for everything else. Each round it trains from the global state and hands the
result to its party, which applies the federation's rules (DP, the algorithm's weight, the
round's mask), prunes and encrypts it; then the party applies the aggregate and the site
evaluates the new global state on its own held-out part.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

from ..config import RunConfig
from ..data.files import load_instruction_data
from ..data.sites import holdout
from ..data.tokenize import tokenize_fitting
from ..base.errors import KeyMaterialError, ParameterError
from ..training.evaluation import generate_samples, write_adapter_meta
from ..he import Context, EncryptedUpdate
from ..he.budget import DecryptionBudget
from ..trust.identity import Identity, PublicIdentity
from ..training.adapter_io import save_adapter
from ..training.loop import evaluate_loss, train_local
from ..trust.guard import AggregateGuard, Provenance, sign_share, sign_update
from ..trust.federation import Federation
from .key_setup import KeyHolder
from .adapter_store import adapter_fingerprint
from .messages import EvalReply, RoundPlan, SiteInfo, TrainReply
from .party import Party
from ..trust.quorum import min_updates_for
from .train_fn import TrainPlan, run_train_fn

log = logging.getLogger("fedshield")


@dataclass
class SiteData:
    """A site's examples, tokenized: what it trains on and what it holds out."""

    name: str
    path: str                       # its data file, as given
    train: dict                     # input_ids / attention_mask / labels
    eval: dict
    train_examples: int
    eval_examples: int
    samples: list = field(default_factory=list)   # held-out prompts for generated answers
    stats: dict = field(default_factory=dict)     # truncated / skipped examples


def load_site_data(path: str | Path, *, tokenizer, cfg: RunConfig, columns: str = "",
                   eval_path: str | Path | None = None, name: str | None = None) -> SiteData:
    """Reads one site's file; holds out its last ``data.eval_fraction`` after a seeded shuffle
    (or evaluates on ``eval_path``, a file of its own). Long prompts lose tokens from the left;
    answers too long for ``data.max_len`` are skipped (logged)."""
    path = str(path)
    examples = load_instruction_data(path, columns)
    if eval_path is not None:
        train_ex, eval_ex = examples, load_instruction_data(eval_path, columns)
    else:
        train_ex, eval_ex = holdout(examples, cfg.data.eval_fraction, cfg.training.seed,
                                    source=path)
    compact = cfg.model.compact_template
    train, train_stats = tokenize_fitting(train_ex, tokenizer, cfg.data.max_len, compact=compact,
                                          source=path)
    held, eval_stats = tokenize_fitting(eval_ex, tokenizer, cfg.data.max_len, compact=compact,
                                        source=f"{eval_path or path}, held-out")
    stats = {"truncated": train_stats["truncated"], "skipped": train_stats["skipped"],
             "eval_truncated": eval_stats["truncated"], "eval_skipped": eval_stats["skipped"]}
    return SiteData(name=name or Path(path).stem, path=path, train=train, eval=held,
                    train_examples=train_stats["kept"], eval_examples=eval_stats["kept"],
                    samples=list(eval_ex[:cfg.training.samples]), stats=stats)


class _Timer:
    def __init__(self) -> None:
        self.seconds = {"train": 0.0, "prune": 0.0, "encrypt": 0.0}

    @contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start


class Site:
    """One site: its data, its model (through its Party) and fedshield's training loop, or the
    site's own (``train_fn``, see fedshield.fl.train_fn; ``site_config`` is handed to it)."""

    def __init__(self, party_id: int, party: Party, data: SiteData, cfg: RunConfig,
                 tokenizer, *, train_fn=None, site_config: Mapping | None = None,
                 identity: Identity | None = None) -> None:
        if party.ctx is not None and not cfg.he.enabled:
            raise ValueError("he.enabled=False but the party has a context")
        if party.algorithm != cfg.training.algorithm:
            raise ValueError(f"the party runs algorithm {party.algorithm!r}, the run "
                             f"{cfg.training.algorithm!r}")
        if (party.dp_clip, party.dp_noise) != (cfg.dp.clip, cfg.dp.noise):
            raise ValueError(f"the party's DP (clip {party.dp_clip:g}, noise "
                             f"{party.dp_noise:g}) is not the run's (clip {cfg.dp.clip:g}, "
                             f"noise {cfg.dp.noise:g}): make it with Party.for_run")
        if cfg.he.enabled and identity is None:
            raise ValueError("an encrypted federation needs the site's identity (it signs "
                             "every update and share)")
        self.party_id = party_id
        self.party = party
        self.identity = identity
        self.keys: KeyHolder | None = None       # the key set-up's party half (protocol)
        self.data = data
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.train_fn = train_fn
        self.site_config = dict(site_config or {})

    @property
    def name(self) -> str:
        return self.data.name

    def __repr__(self) -> str:
        return (f"Site({self.party_id}, {self.name!r}, {self.data.train_examples} training / "
                f"{self.data.eval_examples} held-out examples)")

    # -- enrolment and evaluation ---------------------------------------------------------------
    def evaluate(self) -> float:
        """Held-out loss of the global state on this site's own held-out part."""
        self.party.load_global()
        return evaluate_loss(self.party.model, self.data.eval, batch_size=32)

    def info(self) -> SiteInfo:
        """What the site enrols with (the held-out loss of the initial global state)."""
        ctx = self.party.ctx
        return SiteInfo(party=self.party_id, name=self.name, data=self.data.path,
                        train_examples=self.data.train_examples,
                        eval_examples=self.data.eval_examples, eval_loss=self.evaluate(),
                        context_fp=ctx.fingerprint.hex() if ctx is not None else "",
                        num_lora_values=self.party.layout.numel,
                        identity=("" if self.identity is None
                                  else self.identity.public.to_bytes().hex()))

    # -- keys -------------------------------------------------------------------------------------
    def key_holder(self, key_file: str | Path, *, federation: Federation | None = None,
                   trust_server_roster: bool = False) -> KeyHolder:
        """This site's half of the key set-up (protocol), writing its key to ``key_file`` and
        holding every key set-up to its pinned ``federation`` (or, simulations only, trusting
        the server's roster: ``trust_server_roster``)."""
        self.keys = KeyHolder(self.party_id, self.identity, key_file, federation=federation,
                              trust_server_roster=trust_server_roster)
        return self.keys

    def use_keys(self, ctx: Context, roster: Mapping[int, PublicIdentity],
                 server: PublicIdentity, budget_file: str | Path | None = None, *,
                 guard: tuple[int, bool] | None = None) -> None:
        """Takes the keys of a (new) key epoch: the party decrypts with ``ctx``, only what its
        guard admits (bound by the ``server``'s record to updates signed by the ``roster``'s
        parties, at least ``guard`` = (fewest parties, verify); default: the run's quorum and
        verify_aggregates) and within the decryption budget counted in ``budget_file``."""
        budget = None if budget_file is None else DecryptionBudget(
            budget_file, 2 ** ctx.params.flood_log_queries)
        if budget is not None and budget.context_fp != ctx.fingerprint:
            budget.reset_for(ctx.fingerprint)
        self.party.set_keys(ctx, budget)
        min_parties, verify = guard or (min_updates_for(self.cfg), self.cfg.keys.verify)
        self.party.guard = AggregateGuard(roster, server, min_parties, verify=verify)

    def take_committed_keys(self) -> None:
        """After the key set-up's commit: the keys it wrote become the party's, guarded as the
        key set-up agreed (the pinned floor at least)."""
        holder = self.keys
        if holder is None or holder.committed is None:
            raise KeyMaterialError(f"site {self.party_id} holds no committed key")
        self.use_keys(holder.committed, holder.roster, holder.server, holder.budget_file,
                      guard=holder.guard_settings)

    # -- one round --------------------------------------------------------------------------------
    def round_mask(self, plan: RoundPlan):
        """The round's common mask (prune=global after round 1), as the party keeps it."""
        return self.party.round_mask(plan.round,
                                     plan.prune_ratio if plan.global_mask else 0.0)

    def train_round(self, plan: RoundPlan) -> TrainReply:
        """Trains from the global state; the party prepares (DP, pruning) and encrypts."""
        cfg, party = self.cfg, self.party
        timer = _Timer()
        party.load_global()
        seed = cfg.training.seed * 1_000_003 + plan.round * 1009 + self.party_id
        metrics = None
        with timer.phase("train"):
            if self.train_fn is None:
                result = train_local(party.model, self.data.train,
                                     steps=cfg.training.local_steps,
                                     batch_size=cfg.training.batch_size, lr=plan.lr,
                                     grad_accum=cfg.training.grad_accum, seed=seed)
            else:
                result = self._own_training(plan, seed)
                metrics = result["metrics"]
        examples = result["num_examples"]
        with timer.phase("prune"):
            local_ratio = plan.prune_ratio if plan.prune == "local" else 0.0
            prepared = party.prepare(prune_ratio=local_ratio, mask=self.round_mask(plan))
        common = dict(party=self.party_id, round=plan.round, train_loss=float(result["loss"]),
                      kept_fraction=prepared.kept_fraction, update_norm=prepared.update_norm,
                      metrics=metrics)
        if party.ctx is None:
            values = {k: v.detach().cpu().numpy().astype(np.float32)
                      for k, v in prepared.values.items()}
            return TrainReply(**common, seconds=timer.seconds, values=values,
                              weight=party.weight_for(examples))
        with timer.phase("encrypt"):
            upd = party.encrypt(prepared, examples, round=plan.round,
                                weight_bound=plan.weight_bound).to_bytes()
            signature = sign_update(self.identity, self.party_id, upd)
        return TrainReply(**common, seconds=timer.seconds, update=upd, signature=signature)

    def _own_training(self, plan: RoundPlan, seed: int) -> dict:
        """The site's train-fn for this round; its example count must stay within the
        federation's weight bound (set from the counts the sites enrolled with)."""
        cfg = self.cfg
        own = TrainPlan(round=plan.round, lr=plan.lr, steps=cfg.training.local_steps,
                        batch_size=cfg.training.batch_size, grad_accum=cfg.training.grad_accum,
                        seed=seed, tokenizer=self.tokenizer, train=self.data.train,
                        site_config=self.site_config)
        n, metrics = run_train_fn(self.train_fn, self.party.model, own)
        if self.party.weight_for(n) > plan.weight_bound:
            raise ParameterError(f"train-fn returned num_examples={n}, above the federation's "
                                 f"weight bound {plan.weight_bound:g} (set from the example "
                                 "counts the sites enrolled with)")
        return {"loss": metrics["loss"], "num_examples": n, "metrics": metrics}

    def partial_decrypt(self, agg: EncryptedUpdate | bytes, present: list[int], *,
                        provenance: Provenance | None = None) -> tuple[bytes, bytes]:
        """Threshold keys: (this party's partial decryption, its signed record), once the
        party's guard admits the aggregate."""
        agg = agg if isinstance(agg, EncryptedUpdate) else EncryptedUpdate.from_bytes(agg)
        share = self.party.partial_decrypt(agg, present=present, provenance=provenance)
        return share, sign_share(self.identity, self.party_id, agg.round, share)

    def apply(self, plan: RoundPlan, *, agg: EncryptedUpdate | bytes | None = None,
              shares: Iterable[bytes] | None = None,
              average: Mapping | None = None, **checks) -> float:
        """Applies the round's result: the aggregate (decrypted here, or fused from the
        ``shares``), or an already decrypted/plaintext ``average``. ``checks``: ``provenance``
        and ``share_records`` for the party's guard. Returns the seconds spent
        decrypting."""
        start = time.perf_counter()
        if average is None:
            self.round_mask(plan)  # made now unless this party trained in the round
            average = self.party.decrypt(agg, shares, **checks)
        seconds = time.perf_counter() - start
        self.party.apply_average(average, version=plan.round)
        return seconds

    def eval_reply(self, seconds_decrypt: float = 0.0) -> EvalReply:
        return EvalReply(party=self.party_id, version=self.party.version,
                         eval_loss=self.evaluate(), eval_examples=self.data.eval_examples,
                         seconds_decrypt=seconds_decrypt, budget_left=self.party.budget_left,
                         adapter_fp=adapter_fingerprint(self.party.global_state))

    def samples(self) -> list[dict]:
        """The global model's greedy answers to this site's first held-out prompts."""
        self.party.load_global()
        return generate_samples(self.party.model, self.tokenizer, self.data.samples,
                                compact=self.cfg.model.compact_template,
                                max_new_tokens=self.cfg.training.sample_tokens)

    def save_adapter(self, out: str | Path, show_progress: bool = False) -> Path:
        """OUT/adapter (PEFT) with the global state, and what `fedshield eval` needs."""
        self.party.load_global()
        base = save_adapter(self.party.model, self.tokenizer, Path(out), self.cfg.model,
                            seed=self.cfg.training.seed, show_progress=show_progress)
        write_adapter_meta(Path(out) / "adapter", compact=self.cfg.model.compact_template,
                           max_len=self.cfg.data.max_len, base=str(base))
        return Path(out) / "adapter"

