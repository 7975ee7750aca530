"""The Server: the keyless half of a federation, the same for every engine.

A thin coordinator of its parts, each one idea: who is in the run (fedshield.fl.membership),
the screen of every reply before any arithmetic (fedshield.fl.screening), the run record
(fedshield.fl.record) and the key epochs (fedshield.fl.key_epochs). The Server plans each
round, adds the accepted ciphertexts natively, collects and checks partial decryptions, and
records every exclusion. It holds the public context only and needs neither torch nor openfhe.

Engines drive it step by step and own only the transport: the local engine calls the sites
in-process, the Flower engine turns messages into the typed replies of fedshield.fl.messages.
Sites are addressed by an opaque ``node`` id of the transport (the local engine uses the party
id); every exclusion names the node, the party and the reason, and lands in the run record.
Both engines checkpoint and resume it the same way (:meth:`Server.checkpoint`,
:meth:`Server.restore`).
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Iterable, Mapping

import numpy as np

from ..base.errors import FedShieldError
from ..config import RunConfig
from ..dp.accountant import dp_summary, epsilon_rdp
from ..he import Context, EncryptedUpdate, aggregate
from ..trust.guard import Provenance
from ..trust.identity import Identity, PublicIdentity
from ..trust.quorum import min_updates_for
from .key_epochs import SHARE_ATTEMPTS, KeyEpochs
from .membership import Membership, weight_bound_for
from .messages import EvalReply, RoundPlan, SiteInfo, TrainReply
from .record import CatchUp, Exclusion, RoundRecord, RoundsChange, RunRecord
from .schedule import cosine_lr, prune_ratio
from .screening import ScreenedUpdate, screen, screen_share

log = logging.getLogger("fedshield")

CHECKPOINT_FORMAT = 1

__all__ = ["SHARE_ATTEMPTS", "Server", "plaintext_average", "weight_bound_for"]


def plaintext_average(replies: list[TrainReply]) -> dict[str, np.ndarray]:
    """FedAvg in float64 (the baseline without HE, and the reference of the encrypted path)."""
    total = float(sum(r.weight for r in replies))
    names = replies[0].values.keys()
    return {name: (sum(r.weight * np.asarray(r.values[name], dtype=np.float64)
                       for r in replies) / total).astype(np.float32) for name in names}


class Server:
    """See the module docstring. ``ctx`` is the public context (None: plaintext baseline)."""

    def __init__(self, cfg: RunConfig, ctx: Context | None, *, engine: str,
                 flood_bits: int | None = None, identity: Identity | None = None) -> None:
        if ctx is not None and not cfg.he.enabled:
            raise FedShieldError("he.enabled=False but the server was given a context")
        self.cfg = cfg
        self.min_updates = min_updates_for(cfg)
        self.members = Membership(cfg.n_sites, he=cfg.he.enabled,
                                  unit_weights=cfg.training.algorithm == "paper")
        self.keys = KeyEpochs(he=cfg.he.enabled, threshold=cfg.keys.mode == "threshold")
        self.current: RoundRecord | None = None
        self.seen: set[bytes] = set()              # digests of every update aggregated so far
        # its identity key (a deployment's is pinned in the sites' federation file; else one
        # made here): it signs each aggregate's provenance
        self.identity = (identity or Identity.generate()) if cfg.he.enabled else None
        self.provenance: Provenance | None = None  # of the round's aggregate
        self.share_records: dict[int, bytes] = {}  # party -> signed record of its share
        self._wall_start = 0.0
        self.record = RunRecord(config=cfg.to_dict(), engine=engine,
                                server_has_secret_key=False if cfg.he.enabled else None,
                                flood_bits=flood_bits, min_clients=self.min_updates)
        if ctx is not None:  # after the record: set_context writes the resolved parameters in it
            self.set_context(ctx)

    # -- what the engines read of the parts ----------------------------------------------------
    @property
    def participants(self) -> dict[int, int]:
        """node -> party of every participant still in the run."""
        return self.members.participants

    @property
    def roster(self) -> dict[int, PublicIdentity]:
        return self.members.roster

    @property
    def version(self) -> int:
        """The last round whose aggregate was applied."""
        return self.members.version

    @property
    def restored_roster(self) -> dict[int, PublicIdentity] | None:
        return self.members.restored_roster

    @property
    def resumed(self) -> bool:
        """This run goes on from a checkpoint (its parties enrol again)."""
        return self.members.resumed

    @property
    def weight_bound(self) -> float | None:
        return self.members.weight_bound

    @property
    def ctx(self) -> Context | None:
        return self.keys.ctx

    @property
    def epoch(self) -> int:
        """The key epoch (0: keys not set up yet)."""
        return self.keys.epoch

    @property
    def threshold(self) -> int:
        return self.cfg.keys.threshold or self.cfg.n_sites

    def node_of(self, party: int) -> int | None:
        return self.members.node_of(party)

    # -- key epochs ----------------------------------------------------------------------------
    def set_context(self, ctx: Context) -> None:
        """The public context of the federation's keys (after each key epoch's set-up)."""
        self.keys.set_context(ctx)
        self.record.ckks_params = ctx.params.to_dict()  # what the keys resolved to

    def key_epoch_done(self, epoch: int, ctx: Context, before_round: int, seconds: float,
                       checked: int, message_steps: int = 0) -> None:
        """Records a key set-up (or rotation) and switches to its public context."""
        self.record.key_epochs.append(self.keys.begin(epoch, ctx, before_round, seconds,
                                                      checked, message_steps))
        self.record.ckks_params = ctx.params.to_dict()

    def needs_new_keys(self) -> bool:
        """Before planning a round: no keys yet, or some party's key may not decrypt one more
        round (its aggregate's ciphertexts, as often as shares may be asked for)."""
        return self.keys.needs_new_keys(self.record.rounds)

    # -- exclusions ----------------------------------------------------------------------------
    def exclude(self, round_idx: int, stage: str, node: int | None, reason: str, *,
                party: int | None = None, drop: bool = False) -> None:
        """Records an exclusion; ``drop`` also removes the node from the rest of the run."""
        if party is None and node is not None:
            party = self.participants.get(node)
        event = Exclusion(round=round_idx, stage=stage, node=node, party=party, reason=reason)
        if drop and self.members.drop(node):
            event["dropped"] = True
        self.record.events.append(event)
        if self.current is not None and self.current.round == round_idx:
            self.current.excluded.append(event)
        log.warning("round %d, %s: excluded party %s (node %s)%s: %s", round_idx, stage, party,
                    node, ", dropped from the run" if drop else "", reason)

    # -- enrolment -----------------------------------------------------------------------------
    def enrol(self, joins: Iterable[tuple[int, SiteInfo]],
              versions: Mapping[int, int] | None = None,
              fingerprints: Mapping[int, str] | None = None) -> dict[int, int]:
        """Fixes the participants (node -> party) from the sites' join replies; a node that
        comes later is never sent work. Sets the weight bound and the initial eval loss.
        ``versions``: party -> the round of the adapter it holds (0 when not given), and
        ``fingerprints`` that adapter's fingerprint. A resumed run takes back only the
        identities it had, counts a party as behind when its adapter is not the one it last
        reported, and keeps its initial eval loss."""
        fp = self.ctx.fingerprint.hex() if self.ctx is not None else None
        for rejected in self.members.enrol(joins, versions or {}, fingerprints or {}, fp):
            self.exclude(0, "join", rejected.node, rejected.reason, party=rejected.party,
                         drop=rejected.drop)
        record = self.record
        record.num_lora_values = self.members.num_lora_values
        if not self.resumed:  # a resumed run measured these when it started
            record.take_sites(self.members.sites, self.cfg.n_sites)
        if self.roster:
            record.identities = {str(p): r.fingerprint() for p, r in sorted(self.roster.items())}
            record.server_identity = self.identity.public.fingerprint()
            log.info("server identity fingerprint %s", self.identity.public.fingerprint())
            for party, identity in sorted(self.roster.items()):
                log.info("party %d identity fingerprint %s (compare it with the site out of "
                         "band)", party, identity.fingerprint())
        log.info("participants (node -> party): %s; weight bound %s", self.participants,
                 self.weight_bound)
        return dict(self.participants)

    # -- parties that missed an aggregate ------------------------------------------------------
    def behind(self) -> list[int]:
        """Participants whose global adapter is not the current one (they missed an
        aggregate, or come back to a resumed run from an older round)."""
        return self.members.behind()

    def catch_up_source(self) -> int | None:
        """The lowest participant that holds the current global adapter."""
        return self.members.catch_up_source()

    def caught_up(self, party: int, source: int, before_round: int,
                  fingerprint: str = "") -> bool:
        """Records a catch-up; False (and the party leaves) when what it took is not the
        adapter its source reported."""
        problem = self.members.take_catch_up(party, source, fingerprint)
        if problem is not None:
            self.catch_up_failed(party, before_round, problem)
            return False
        self.record.catch_ups.append(CatchUp(before_round=before_round, party=party,
                                             source=source, version=self.version))
        log.info("party %d caught up with the global adapter of round %d (from party %d)",
                 party, self.version, source)
        return True

    def catch_up_failed(self, party: int, before_round: int, reason: str) -> None:
        """A party that cannot be brought to the current adapter leaves the run."""
        self.exclude(before_round, "catch-up", self.node_of(party), reason, party=party,
                     drop=True)

    # -- checkpoint: both engines resume from it ------------------------------------------------
    def checkpoint(self) -> dict:
        """What a restarted server needs besides the model state: everything public."""
        dropped = sorted({e["party"] for e in self.record.events if e.get("dropped")
                          and e["party"] is not None})
        return {"format": CHECKPOINT_FORMAT, "round": self.current.round if self.current else 0,
                "epoch": self.epoch, **self.members.to_state(), "dropped": dropped,
                "record": self.record.to_dict()}

    def restore(self, state: dict, *, new_identities: bool = False) -> None:
        """Continues the run ``state`` (from :meth:`checkpoint`): its record, rounds, key epoch
        and roster; the sites enrol again and must be the same parties (``new_identities``:
        with identity keys made anew, as a simulation in one process does). Call it before
        :meth:`enrol`. A changed total of rounds is recorded (the schedules follow it)."""
        if state.get("format") != CHECKPOINT_FORMAT:
            raise FedShieldError(f"server state format {state.get('format')!r} is not "
                                 f"{CHECKPOINT_FORMAT}")
        if self.participants:
            raise FedShieldError("restore the server before the sites enrol")
        record = RunRecord.from_dict(state["record"])
        planned = record.config.get("training", {}).get("rounds")
        rounds = self.cfg.training.rounds
        if planned is not None and planned != rounds:
            record.rounds_changed.append(RoundsChange(after_round=int(state["version"]),
                                                      rounds=rounds, was=planned))
            log.info("resuming after round %s with rounds=%d (was %d)", state["version"],
                     rounds, planned)
        record.config = self.cfg.to_dict()
        record.finished = False
        if self.record.ckks_params is not None:  # the keys this server was given
            record.ckks_params = self.record.ckks_params
        self.record = record
        self.members.restore(state, new_identities=new_identities)
        self.keys.epoch = int(state["epoch"])
        log.info("resuming after round %d (key epoch %d): %d parties expected", self.version,
                 self.epoch, len(state["roster"]) or len(state.get("participants", [])))

    # -- one round -----------------------------------------------------------------------------
    def plan_for(self, round_idx: int, base_version: int | None = None) -> RoundPlan:
        """Round ``round_idx``'s plan, built on the adapter of round ``base_version`` (default:
        the current one), without opening its record: what a train request that also carries
        the previous round's aggregate sends before that round is closed."""
        cfg = self.cfg
        if self.weight_bound is None:
            raise FedShieldError("no site has enrolled: nothing to plan")
        if cfg.he.enabled and self.ctx is None:
            raise FedShieldError("the keys are not set up yet: run the key set-up first")
        ratio = 0.0 if cfg.pruning.mode == "off" else prune_ratio(
            round_idx, cfg.pruning.p0, cfg.pruning.target, cfg.pruning.t_start,
            cfg.prune_t_end)
        return RoundPlan(round=round_idx,
                         lr=cosine_lr(round_idx - 1, cfg.training.rounds, cfg.training.lr,
                                      cfg.training.lr_min),
                         prune=cfg.pruning.mode, prune_ratio=ratio,
                         weight_bound=self.weight_bound,
                         base_version=self.version if base_version is None else base_version)

    def plan(self, round_idx: int) -> RoundPlan:
        """The round's plan; opens its record (status "failed" until it finishes)."""
        plan = self.plan_for(round_idx)
        self.current = RoundRecord(round=round_idx, prune_ratio=plan.prune_ratio, lr=plan.lr)
        self.record.rounds.append(self.current)
        self._wall_start = time.perf_counter()
        log.info("round %d: %d participants (global version %d)", round_idx,
                 len(self.participants), self.version)
        return plan

    def screen_updates(self, plan: RoundPlan,
                       replies: Iterable[tuple[int, TrainReply | BaseException]]
                       ) -> list[ScreenedUpdate]:
        """Every check short of the native one, before any arithmetic (fedshield.fl.screening);
        each refused reply is recorded. A reply may be an exception: the node answered, but
        with an error or a message the transport could not read (its text is the reason).
        Participants that did not reply miss this round's aggregate. Returns the accepted
        replies, each with its update parsed and hashed once; they unpack as (node, reply)."""
        result = screen(plan, replies, participants=self.participants, roster=self.roster,
                        ctx=self.ctx, seen=self.seen)
        for node, reason in result.excluded:
            self.exclude(plan.round, "train", node, reason)
        return result.accepted

    def aggregate(self, plan: RoundPlan, accepted: list[ScreenedUpdate]
                  ) -> EncryptedUpdate | dict[str, np.ndarray] | None:
        """The aggregate of the replies :meth:`screen_updates` accepted (None: the round
        failed, see its record)."""
        entry = self.current
        if any(not isinstance(s, ScreenedUpdate) for s in accepted):
            raise TypeError("Server.aggregate takes what Server.screen_updates accepted "
                            "(ScreenedUpdate)")
        if len(accepted) < self.min_updates:
            return self.fail(f"{len(accepted)} valid updates, {self.min_updates} needed")
        start = time.perf_counter()
        if self.ctx is None:
            result = plaintext_average([s.reply for s in accepted])
            bytes_down = 4 * sum(v.size for v in result.values())
        else:
            rejected: set[int] = set()

            def on_reject(index: int, exc: FedShieldError) -> None:
                rejected.add(index)
                self.exclude(plan.round, "train", accepted[index].node, f"aggregate: {exc}")

            try:
                result = aggregate(self.ctx, (s.update for s in accepted), round=plan.round,
                                   weight_bound=plan.weight_bound, on_reject=on_reject)
            except FedShieldError as exc:
                return self.fail(f"aggregation failed: {exc}")
            accepted = [s for i, s in enumerate(accepted) if i not in rejected]
            if len(accepted) < self.min_updates:
                return self.fail(f"{len(accepted)} valid updates after native validation, "
                                 f"{self.min_updates} needed")
            self.seen.update(s.digest for s in accepted)
            # verify_aggregates: the key holders get the signed updates too
            self.provenance = Provenance.make(
                self.identity, result, [s.reply.signature for s in accepted],
                [s.update.to_bytes() for s in accepted] if self.cfg.keys.verify else None)
            self.share_records = {}
            bytes_down = result.nbytes
            entry.n_ciphertexts = result.n_ciphertexts
        entry.seconds["aggregate"] += time.perf_counter() - start
        entry.take_contributions(sorted((s.reply for s in accepted), key=lambda r: r.party),
                                 bytes_down)
        log.info("round %d: aggregated %d updates from parties %s (%d bytes) in %.3f s",
                 plan.round, len(accepted), entry.clients, bytes_down,
                 entry.seconds["aggregate"])
        return result

    def collect_shares(self, agg: EncryptedUpdate, contributors: list[int],
                       ask: Callable[[list[int]], Mapping[int, object]]
                       ) -> tuple[list[int], dict[int, bytes]] | None:
        """Threshold keys: partial decryptions of ``agg`` from the contributing parties.

        ``ask(present)`` asks every party of ``present`` for its share made for ``present``
        and returns party -> (share bytes, signed record), an exception (its error), or
        nothing (no reply). The records are kept in ``share_records`` for the key holders.
        When some fail and at least t remain, it asks once more without them (each share
        depends on who is present). Returns (present, shares), or None when the round fails.
        """
        r = self.current.round
        present = sorted(p for p in contributors if self.node_of(p) is not None)
        for attempt in range(1, SHARE_ATTEMPTS + 1):
            if len(present) < self.threshold:
                break
            start = time.perf_counter()
            answers = ask(present)
            shares, failed = {}, []
            for party in present:
                node = self.node_of(party)
                answer = answers.get(party)
                reason = ("no share before the timeout" if answer is None
                          else self.share_problem(answer, party, agg, present))
                if reason is not None:
                    self.exclude(r, "share", node, reason)
                    failed.append(party)
                    continue
                shares[party] = bytes(answer[0])
                self.share_records[party] = bytes(answer[1])
            if not failed:
                log.info("round %d: partial decryptions from parties %s in %.2f s (attempt %d)",
                         r, present, time.perf_counter() - start, attempt)
                self.current.decrypting_clients = present
                self.current.bytes_partial_decryptions = sum(len(s) for s in shares.values())
                return present, shares
            present = [p for p in present if p not in failed]
        self.fail(f"not enough partial decryptions: {len(present)} parties present, "
                  f"decryption needs {self.threshold}")
        return None

    def share_problem(self, answer, party: int, agg: EncryptedUpdate,
                      present: list[int]) -> str | None:
        """Why ``party``'s answer to a share request for ``present`` cannot be used (None: it
        can); ``answer`` as :meth:`collect_shares`' ``ask`` returns it."""
        return screen_share(answer, party, self.roster[party], self.ctx, agg, present)

    def finish_round(self, evals: Iterable[tuple[int, EvalReply | BaseException]]
                     ) -> RoundRecord:
        """Takes every participant's held-out loss after it applied the aggregate; one that
        failed to apply it is behind (it catches up before it trains again). Closes the
        round's record."""
        entry = self.current
        r = entry.round
        losses: dict[int, float] = {}
        examples: dict[int, int] = {}
        decrypt, answered, budgets, applied = [], set(), [], []
        for node, reply in evals:
            if node not in self.participants or node in answered:
                self.exclude(r, "evaluate", node, "unexpected evaluate reply")
                continue
            answered.add(node)
            party = self.participants[node]
            if isinstance(reply, BaseException):
                self.exclude(r, "evaluate", node, f"did not apply the aggregate: {reply}")
                self.members.missed(party)
                continue
            if reply.party != party:
                self.exclude(r, "evaluate", node, f"replied as party {reply.party}", drop=True)
                continue
            if reply.version != r:
                self.exclude(r, "evaluate", node, f"did not apply the aggregate: it reports "
                             f"version {reply.version}")
                self.members.missed(party)
                continue
            applied.append(party)
            if reply.eval_loss is not None:   # else the site's metrics policy keeps it
                losses[party], examples[party] = reply.eval_loss, reply.eval_examples
            self.members.applied(party, r, reply.adapter_fp)
            decrypt.append(reply.seconds_decrypt)
            if reply.budget_left >= 0:
                budgets.append(reply.budget_left)
        for node in sorted(set(self.participants) - answered):
            self.exclude(r, "evaluate", node, "no reply before the timeout")
            self.members.missed(self.participants[node])
        self.members.version = r
        self.keys.report_budgets(budgets)
        entry.seconds["decrypt"] += max(decrypt, default=0.0)
        entry.take_evaluation(losses, examples, self.cfg.n_sites, bool(applied))
        dp = self.cfg.dp
        if dp.enabled:
            entry.dp_epsilon = epsilon_rdp(dp.noise, r, dp.delta)
            self.record.dp = dp_summary(dp.clip, dp.noise, dp.delta, r)
        return self._close()

    def fail(self, reason: str) -> None:
        """Marks the current round failed; the global adapter stays as it was."""
        self.current.status = "failed"
        self.current.failure = reason
        log.error("round %d failed: %s; the global adapter stays as it was",
                  self.current.round, reason)
        self._close()
        return None

    def _close(self) -> RoundRecord:
        entry = self.current
        entry.wall_seconds = round(time.perf_counter() - self._wall_start, 4)
        return entry
