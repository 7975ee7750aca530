"""The Server: the keyless half of a federation, the same for every engine.

It enrols the sites, plans each round, screens every reply before any arithmetic, adds the
accepted ciphertexts natively, checks partial decryptions, and keeps the run record
(metrics.json). It holds the public context only and needs neither torch nor openfhe.

Engines drive it step by step and own only the transport: the local engine calls the sites
in-process, the Flower engine turns messages into the typed replies of fedshield.fl.messages.
Sites are addressed by an opaque ``node`` id of the transport (the local engine uses the party
id); every exclusion names the node, the party and the reason, and lands in the run record.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections import Counter
from typing import Callable, Iterable, Mapping

import numpy as np

from ..config import RunConfig
from ..dp.accountant import dp_summary, epsilon_rdp
from ..base.errors import FedShieldError
from ..he import Context, EncryptedUpdate, PartialDecryption, aggregate
from ..trust.identity import Identity, PublicIdentity, verify_blob
from ..trust.guard import SHARE_DOMAIN, UPDATE_DOMAIN, Provenance
from .messages import EvalReply, RoundPlan, SiteInfo, TrainReply
from ..trust.quorum import min_updates_for
from ..training.metrics import perplexity, weighted_loss
from .record import RoundRecord, RunRecord
from .schedule import cosine_lr, prune_ratio

log = logging.getLogger("fedshield")

# Shares asked for at most this many times per round (each time without the parties that
# failed, as long as enough remain).
SHARE_ATTEMPTS = 2


def weight_bound_for(train_examples: Iterable[int]) -> float:
    """A public bound on every site's weight: the next power of two of the largest example
    count (it cancels out of sum(w*x)/sum(w); the error of the average grows with it)."""
    largest = max(train_examples)
    return float(2 ** math.ceil(math.log2(max(largest, 1))))


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
        self.ctx: Context | None = None
        self.min_updates = min_updates_for(cfg)
        self.participants: dict[int, int] = {}     # node -> party
        self.sites: dict[int, SiteInfo] = {}       # party -> what it enrolled with
        self.version = 0                           # last round whose aggregate was applied
        # party -> the round of the global adapter it holds, as far as the server knows (None:
        # it missed an aggregate; it is sent the current adapter before it trains again)
        self.party_versions: dict[int, int | None] = {}
        self.restored_roster: dict[int, PublicIdentity] | None = None   # a resumed run's
        self.adapter_fps: dict[int, str] = {}      # party -> fingerprint of what it applied
        self.weight_bound: float | None = None
        self.num_lora_values = 0
        self.current: RoundRecord | None = None
        self._seen: set[bytes] = set()             # digests of every update accepted so far
        self.roster: dict[int, PublicIdentity] = {}  # party -> identity (HE: from enrolment)
        # its identity key (a deployment's is pinned in the sites' federation file; else one
        # made here): it signs each aggregate's provenance
        self.identity = (identity or Identity.generate()) if cfg.he.enabled else None
        self.provenance: Provenance | None = None  # of the round's aggregate
        self.share_records: dict[int, bytes] = {}  # party -> signed record of its share
        self.epoch = 0                             # key epoch (0: keys not set up yet)
        self.budget_left: int | None = None        # smallest count the parties reported
        self._wall_start = 0.0
        self.record = RunRecord(config=cfg.to_dict(), engine=engine,
                                server_has_secret_key=False if cfg.he.enabled else None,
                                flood_bits=flood_bits, min_clients=self.min_updates)
        if ctx is not None:  # after the record: set_context writes the resolved parameters in it
            self.set_context(ctx)

    def set_context(self, ctx: Context) -> None:
        """The public context of the federation's keys (after each key epoch's set-up)."""
        if ctx.has_secret_key or ctx.is_party:
            raise FedShieldError("the server must hold a public context only (saved without "
                                 "its secret key)")
        self.ctx = ctx
        self.record.extra["ckks_params"] = ctx.params.to_dict()  # what the keys resolved to

    def key_epoch_done(self, epoch: int, ctx: Context, before_round: int, seconds: float,
                       checked: int, message_steps: int = 0) -> None:
        """Records a key set-up (or rotation) and switches to its public context."""
        self.set_context(ctx)
        self.epoch = epoch
        self.budget_left = None
        self.record.extra.setdefault("key_epochs", []).append(
            {"epoch": epoch, "before_round": before_round, "seconds": round(seconds, 3),
             "subsets_checked": checked, "message_steps": message_steps,
             "context_fp": ctx.fingerprint.hex()})

    def needs_new_keys(self) -> bool:
        """Before planning a round: no keys yet, or some party's key may not decrypt one more
        round (its aggregate's ciphertexts, as often as shares may be asked for)."""
        if not self.cfg.he.enabled:
            return False
        if self.ctx is None:
            return True
        if self.budget_left is None or not self.record.rounds:
            return False
        last = next((r for r in reversed(self.record.rounds) if r.n_ciphertexts), None)
        per_round = (last.n_ciphertexts if last else 0) * (
            SHARE_ATTEMPTS if self.cfg.keys.mode == "threshold" else 1)
        return self.budget_left < per_round

    # -- bookkeeping -------------------------------------------------------------------------
    @property
    def threshold(self) -> int:
        return self.cfg.keys.threshold or self.cfg.n_sites

    def node_of(self, party: int) -> int | None:
        return next((n for n, p in self.participants.items() if p == party), None)

    def exclude(self, round_idx: int, stage: str, node: int | None, reason: str, *,
                party: int | None = None, drop: bool = False) -> None:
        """Records an exclusion; ``drop`` also removes the node from the rest of the run."""
        if party is None and node is not None:
            party = self.participants.get(node)
        event = {"round": round_idx, "stage": stage, "node": node, "party": party,
                 "reason": reason}
        if drop and node in self.participants:
            del self.participants[node]
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
        versions, fingerprints = versions or {}, fingerprints or {}
        n_sites = self.cfg.n_sites
        fp = self.ctx.fingerprint.hex() if self.ctx is not None else ""
        accepted: list[tuple[int, SiteInfo]] = []
        for node, info in joins:
            identity = self._identity(info)
            if not 0 <= info.party < n_sites:
                self.exclude(0, "join", node, f"party id {info.party} not in [0, {n_sites})",
                             party=info.party)
            elif self.ctx is not None and info.context_fp != fp:
                self.exclude(0, "join", node, "holds a key of another context", party=info.party)
            elif info.party in self.sites:
                self.exclude(0, "join", node, f"party id {info.party} claimed twice",
                             party=info.party)
            elif isinstance(identity, str):
                self.exclude(0, "join", node, identity, party=info.party)
            elif (self.restored_roster is not None
                  and self.restored_roster.get(info.party) != identity):
                self.exclude(0, "join", node, f"not the identity party {info.party} had before "
                             "the run was resumed", party=info.party)
            else:
                self.participants[node] = info.party
                self.sites[info.party] = info
                self.party_versions[info.party] = int(versions.get(info.party, 0))
                known = self.adapter_fps.get(info.party)
                if (known and self.party_versions[info.party] == self.version
                        and fingerprints.get(info.party) != known):
                    log.warning("party %d holds another adapter of round %d than it reported; "
                                "it catches up", info.party, self.version)
                    self.party_versions[info.party] = None
                if identity is not None:
                    self.roster[info.party] = identity
                accepted.append((node, info))
        sizes = Counter(info.num_lora_values for _, info in accepted)
        if sizes:
            self.num_lora_values, _ = sizes.most_common(1)[0]
            for node, info in accepted:
                if info.num_lora_values != self.num_lora_values:
                    self.exclude(0, "join", node, f"its LoRA state has {info.num_lora_values} "
                                 f"values, the others' {self.num_lora_values}", drop=True)
                    del self.sites[info.party]
        if self.sites:
            # paper: every site weighs 1 (an unweighted average); else its example count. A
            # bound far above the weights would cost precision (encrypt_update refuses it).
            self.weight_bound = weight_bound_for(
                [1] if self.cfg.training.algorithm == "paper"
                else [s.train_examples for s in self.sites.values()])
        losses = {p: s.eval_loss for p, s in self.sites.items() if s.eval_loss is not None}
        examples = {p: s.eval_examples for p, s in self.sites.items()}
        record = self.record
        record.num_lora_values = self.num_lora_values
        if self.restored_roster is None:  # a resumed run measured these when it started
            record.sites = [self.sites[p] for p in sorted(self.sites)]
            record.initial_eval_loss = weighted_loss(losses, examples)
            record.initial_site_eval_loss = [losses.get(p) for p in range(n_sites)]
        if self.roster:
            record.extra["identities"] = {str(p): r.fingerprint()
                                          for p, r in sorted(self.roster.items())}
            record.extra["server_identity"] = self.identity.public.fingerprint()
            log.info("server identity fingerprint %s", self.identity.public.fingerprint())
            for party, identity in sorted(self.roster.items()):
                log.info("party %d identity fingerprint %s (compare it with the site out of "
                         "band)", party, identity.fingerprint())
        log.info("participants (node -> party): %s; weight bound %s", self.participants,
                 self.weight_bound)
        return dict(self.participants)

    def _identity(self, info: SiteInfo) -> PublicIdentity | str | None:
        """The site's public identity, None without HE, or why it cannot be used."""
        if not self.cfg.he.enabled:
            return None
        try:
            identity = PublicIdentity.from_bytes(bytes.fromhex(info.identity))
        except (ValueError, FedShieldError) as exc:
            return f"no usable identity key: {exc}"
        if identity in self.roster.values():
            return "the same identity key as another party"
        return identity

    # -- parties that missed an aggregate ------------------------------------------------------
    def behind(self) -> list[int]:
        """Participants whose global adapter is not the current one (they missed an
        aggregate, or come back to a resumed run from an older round)."""
        return sorted(p for p in self.participants.values()
                      if self.party_versions.get(p) != self.version)

    def catch_up_source(self) -> int | None:
        """The lowest participant that holds the current global adapter."""
        current = [p for p in self.participants.values()
                   if self.party_versions.get(p) == self.version]
        return min(current, default=None)

    def caught_up(self, party: int, source: int, before_round: int,
                  fingerprint: str = "") -> bool:
        """Records a catch-up; False (and the party leaves) when what it took is not the
        adapter its source reported."""
        expected = self.adapter_fps.get(source)
        if expected and fingerprint != expected:
            self.catch_up_failed(party, before_round, f"took an adapter ({fingerprint[:12]}) "
                                 f"that is not party {source}'s ({expected[:12]})")
            return False
        self.party_versions[party] = self.version
        self.adapter_fps[party] = fingerprint or expected or ""
        self.record.extra.setdefault("catch_ups", []).append(
            {"before_round": before_round, "party": party, "from": source,
             "version": self.version})
        log.info("party %d caught up with the global adapter of round %d (from party %d)",
                 party, self.version, source)
        return True

    def catch_up_failed(self, party: int, before_round: int, reason: str) -> None:
        """A party that cannot be brought to the current adapter leaves the run."""
        self.exclude(before_round, "catch-up", self.node_of(party), reason, party=party,
                     drop=True)

    # -- checkpoint (a resumed ServerApp goes on from here) -------------------------------------
    def checkpoint(self) -> dict:
        """What a restarted server needs besides metrics.json: everything public."""
        dropped = sorted({e["party"] for e in self.record.events if e.get("dropped")
                          and e["party"] is not None})
        return {"format": 1, "round": self.current.round if self.current else 0,
                "version": self.version, "epoch": self.epoch,
                "weight_bound": self.weight_bound, "num_lora_values": self.num_lora_values,
                "participants": sorted(self.participants.values()), "dropped": dropped,
                "roster": {str(p): r.to_bytes().hex() for p, r in sorted(self.roster.items())},
                "party_versions": {str(p): v for p, v in sorted(self.party_versions.items())},
                # each party's global adapter as it reported it: one that comes back to a
                # resumed run holding another is behind, whatever round it claims
                "adapter_fps": {str(p): f for p, f in sorted(self.adapter_fps.items())},
                "record": self.record.to_dict()}

    def restore(self, state: dict) -> None:
        """Continues the run ``state`` (from :meth:`checkpoint`): its record, rounds, key epoch
        and roster; the sites enrol again and must be the same parties."""
        if state.get("format") != 1:
            raise FedShieldError(f"server state format {state.get('format')!r} is not 1")
        self.record = RunRecord.from_dict(state["record"])
        self.record.config = self.cfg.to_dict()
        self.record.finished = False
        self.version = int(state["version"])
        self.epoch = int(state["epoch"])
        self.restored_roster = {int(p): PublicIdentity.from_bytes(bytes.fromhex(h))
                                for p, h in state["roster"].items()}
        self.adapter_fps = {int(p): f for p, f in state.get("adapter_fps", {}).items()}
        log.info("resuming after round %d (key epoch %d): %d parties expected", self.version,
                 self.epoch, len(self.restored_roster))

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
                       ) -> list[tuple[int, TrainReply]]:
        """Every check short of the native one, before any arithmetic. A reply may be an
        exception: the node answered, but with an error or a message the transport could not
        read (its text is the reason). Participants that did not reply at all are dropped from
        the run (they miss this round's aggregate)."""
        r = plan.round
        candidates, answered, digests = [], set(), set()
        for node, reply in replies:
            if node not in self.participants:
                self.exclude(r, "train", node, "not an enrolled participant (joined late?)")
                continue
            if node in answered:
                self.exclude(r, "train", node, "second reply in one round")
                continue
            answered.add(node)
            if isinstance(reply, BaseException):
                self.exclude(r, "train", node, str(reply))
                continue
            reason = self._screen_one(plan, node, reply, digests)
            if reason is None:
                candidates.append((node, reply))
                if reply.update is not None:
                    digests.add(hashlib.sha256(reply.update).digest())
            else:
                self.exclude(r, "train", node, reason)
        for node in sorted(set(self.participants) - answered):
            # a slow party still gets the aggregate; one that is gone misses it and is dropped
            # when it does not answer its catch-up either
            self.exclude(r, "train", node, "no reply before the timeout")
        if self.ctx is None:
            return candidates
        return self._majority(r, candidates)

    def _screen_one(self, plan: RoundPlan, node: int, reply: TrainReply,
                    digests: set[bytes]) -> str | None:
        """Why one reply cannot be used (None: it can)."""
        party = self.participants[node]
        if reply.party != party:
            return f"claims party {reply.party}, enrolled as {party}"
        if self.ctx is None:
            if reply.values is None or reply.weight is None:
                return "a plaintext round needs the update values and the weight"
            if not (math.isfinite(reply.weight) and 0 < reply.weight <= plan.weight_bound):
                return f"weight {reply.weight!r} is not in (0, {plan.weight_bound:g}]"
            return None
        if reply.update is None:
            return "invalid reply: no encrypted update"
        try:
            upd = EncryptedUpdate.from_bytes(reply.update)
        except FedShieldError as exc:
            return f"invalid reply: {exc}"
        digest = hashlib.sha256(reply.update).digest()
        if upd.round != plan.round:
            return f"update of round {upd.round} in round {plan.round} (a replay or a stale client)"
        if digest in self._seen:
            return "replays an update already aggregated"
        if digest in digests:
            return "the same update bytes as another reply of this round"
        if upd.is_aggregate or upd.n_summed != 1:
            return "sent an aggregate, not a client update"
        if upd.context_fingerprint != self.ctx.fingerprint:
            return "update made under another context"
        if upd.header["weight_bound"] != plan.weight_bound:
            return (f"weight bound {upd.header['weight_bound']:g} is not the round's "
                    f"{plan.weight_bound:g}")
        try:
            verify_blob(self.roster[party], UPDATE_DOMAIN, reply.signature or b"", reply.update,
                        party_id=party, round=plan.round)
        except FedShieldError as exc:
            return f"unauthenticated update: {exc}"
        return None

    def _majority(self, round_idx: int, candidates: list[tuple[int, TrainReply]]
                  ) -> list[tuple[int, TrainReply]]:
        """Honest parties of one round agree on layout and mask; the server cannot compute the
        mask (it never sees the global state), so the majority sets them."""
        def key(reply: TrainReply):
            upd = EncryptedUpdate.from_bytes(reply.update)
            return upd.layout_fingerprint, upd.mask_fingerprint

        keys = {node: key(reply) for node, reply in candidates}
        groups = Counter(keys.values())
        if not groups:
            return []
        (winner, count), *rest = groups.most_common()
        if rest and rest[0][1] == count:
            for node, _ in candidates:
                self.exclude(round_idx, "train", node,
                             "no majority on layout/mask among the replies")
            return []
        accepted = []
        for node, reply in candidates:
            if keys[node] == winner:
                accepted.append((node, reply))
            else:
                self.exclude(round_idx, "train", node, "layout or mask differs from the majority")
        return accepted

    def aggregate(self, plan: RoundPlan, accepted: list[tuple[int, TrainReply]]
                  ) -> EncryptedUpdate | dict[str, np.ndarray] | None:
        """The aggregate of the accepted replies (None: the round failed, see its record)."""
        entry = self.current
        if len(accepted) < self.min_updates:
            return self.fail(f"{len(accepted)} valid updates, {self.min_updates} needed")
        start = time.perf_counter()
        if self.ctx is None:
            result = plaintext_average([reply for _, reply in accepted])
            bytes_down = 4 * sum(v.size for v in result.values())
        else:
            rejected: set[int] = set()

            def on_reject(index: int, exc: FedShieldError) -> None:
                rejected.add(index)
                self.exclude(plan.round, "train", accepted[index][0], f"aggregate: {exc}")

            try:
                result = aggregate(self.ctx, (reply.update for _, reply in accepted),
                                   round=plan.round, weight_bound=plan.weight_bound,
                                   on_reject=on_reject)
            except FedShieldError as exc:
                return self.fail(f"aggregation failed: {exc}")
            accepted = [a for i, a in enumerate(accepted) if i not in rejected]
            if len(accepted) < self.min_updates:
                return self.fail(f"{len(accepted)} valid updates after native validation, "
                                 f"{self.min_updates} needed")
            self._seen.update(hashlib.sha256(reply.update).digest() for _, reply in accepted)
            # verify_aggregates: the key holders get the signed updates too
            self.provenance = Provenance.make(
                self.identity, result, [reply.signature for _, reply in accepted],
                [reply.update for _, reply in accepted] if self.cfg.keys.verify else None)
            self.share_records = {}
            bytes_down = result.nbytes
            entry.n_ciphertexts = result.n_ciphertexts
        entry.seconds["aggregate"] += time.perf_counter() - start
        accepted.sort(key=lambda a: a[1].party)
        replies = [reply for _, reply in accepted]
        entry.clients = [r.party for r in replies]
        entry.train_loss = [r.train_loss for r in replies]
        entry.bytes_up = [r.nbytes for r in replies]
        entry.bytes_down = bytes_down
        entry.kept_fraction = sum(r.kept_fraction for r in replies) / len(replies)
        for phase in ("train", "prune", "encrypt"):
            entry.seconds[phase] += sum(r.seconds.get(phase, 0.0) for r in replies)
        if any(r.update_norm is not None for r in replies):
            entry.update_norm = [r.update_norm for r in replies]
        if any(r.metrics for r in replies):
            entry.train_metrics = [dict(r.metrics or {}) for r in replies]
        entry.decrypting_clients = list(entry.clients)
        log.info("round %d: aggregated %d updates from parties %s (%d bytes) in %.3f s",
                 plan.round, len(replies), entry.clients, bytes_down, entry.seconds["aggregate"])
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
                if answer is None:
                    self.exclude(r, "share", node, "no share before the timeout")
                    failed.append(party)
                    continue
                reason = self._share_problem(answer, party, agg, present)
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

    def _share_problem(self, answer, party: int, agg: EncryptedUpdate,
                       present: list[int]) -> str | None:
        if isinstance(answer, BaseException):
            return str(answer)
        if not (isinstance(answer, tuple) and len(answer) == 2):
            return "malformed share reply (a share and its signed record expected)"
        blob, record = answer
        try:
            verify_blob(self.roster[party], SHARE_DOMAIN, record, blob, party_id=party,
                        round=agg.round)
            share = PartialDecryption.from_bytes(blob)
            if share.party_id != party:
                return f"share of party {share.party_id}"
            if share.present != present:
                return f"share made for present={share.present}"
            share.check_for(self.ctx, agg)  # context, aggregate, residues below q (native)
        except FedShieldError as exc:
            return str(exc)
        return None

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
                self.party_versions[party] = None
                continue
            if reply.party != party:
                self.exclude(r, "evaluate", node, f"replied as party {reply.party}", drop=True)
                continue
            if reply.version != r:
                self.exclude(r, "evaluate", node, f"did not apply the aggregate: it reports "
                             f"version {reply.version}")
                self.party_versions[party] = None
                continue
            applied.append(party)
            if reply.eval_loss is not None:   # else the site's metrics policy keeps it
                losses[party], examples[party] = reply.eval_loss, reply.eval_examples
            self.party_versions[party] = r
            self.adapter_fps[party] = reply.adapter_fp
            decrypt.append(reply.seconds_decrypt)
            if reply.budget_left >= 0:
                budgets.append(reply.budget_left)
        for node in sorted(set(self.participants) - answered):
            self.exclude(r, "evaluate", node, "no reply before the timeout")
            self.party_versions[self.participants[node]] = None
        self.version = r
        if budgets:  # the tightest key decides when the next key epoch is due
            self.budget_left = min(budgets)
        entry.seconds["decrypt"] += max(decrypt, default=0.0)
        entry.site_eval_loss = [losses.get(p) for p in range(self.cfg.n_sites)]
        entry.eval_loss = weighted_loss(losses, examples)
        entry.perplexity = None if entry.eval_loss is None else perplexity(entry.eval_loss)
        if applied:
            entry.status = "ok"
        else:
            entry.failure = "no participant applied the aggregate"
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
