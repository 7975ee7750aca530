"""EncryptedFedAvg: FedAvg's round structure with a keyless, validating, native aggregation step.

Per round ``r`` (see ``docs`` in README, "Deployment on Flower"):

1. ``train``: every participant trains, prunes, encrypts and replies with its EncryptedUpdate.
2. :meth:`EncryptedFedAvg.aggregate_train` screens every reply before any arithmetic (Flower
   errors, unknown or duplicate senders, malformed records, wrong round, replays, another
   context, minority layout/mask/weight bound), then adds the accepted ones natively with
   :func:`fedshield.aggregate` (which validates each again). Threshold mode: it then asks the
   contributing parties for partial decryptions (``query.share``) and screens those too.
3. ``evaluate``: every participant gets the aggregate (and the shares), decrypts it, applies
   the average to its copy of the global adapter and reports its held-out loss.

The server holds the public context only: it never decrypts and never imports openfhe.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections import Counter
from typing import Callable, Iterable

from flwr.common import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from ..aggregate import aggregate
from ..config import RunConfig
from ..errors import FedShieldError, IncompatibleUpdate, InvalidUpdate
from ..he.context import Context
from ..he.threshold import _aggregate_digest, _Share
from ..update import EncryptedUpdate
from .records import (CHUNK_BYTES, STYPE_AGGREGATE, STYPE_SHARE, STYPE_UPDATE, get_payload,
                      put_payload)

log = logging.getLogger("fedshield")

UPDATE = "fedshield.update"
AGGREGATE = "fedshield.aggregate"
SHARE = "fedshield.share"
JOIN = "query.join"
SHARE_REQUEST = "query.share"
TRAIN_METRICS = ("party", "train-loss", "kept", "seconds-train", "seconds-prune",
                 "seconds-encrypt", "lr", "prune-ratio")


def min_clients_for(cfg: RunConfig) -> int:
    """Fewest accepted updates a round needs: cfg.min_clients, else a majority of the
    clients; threshold mode needs at least t (and 2: one update alone is never decrypted)."""
    need = cfg.min_clients or cfg.clients // 2 + 1
    if cfg.keys == "threshold":
        need = max(need, cfg.threshold or cfg.clients, 2)
    return min(need, cfg.clients)


def share_key(party: int) -> str:
    return f"{SHARE}.{party}"


class EncryptedFedAvg(FedAvg):
    """FedAvg whose aggregation adds CKKS ciphertexts without any secret key."""

    def __init__(self, cfg: RunConfig, server_ctx: Context, *, chunk_bytes: int = CHUNK_BYTES,
                 on_round: Callable[[dict], None] | None = None) -> None:
        if server_ctx.has_secret_key or server_ctx.is_party:
            raise FedShieldError("the Flower server must hold a public context only")
        need = min_clients_for(cfg)
        super().__init__(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=need,
                         min_evaluate_nodes=need, min_available_nodes=need)
        self.cfg = cfg
        self.server_ctx = server_ctx
        self.min_clients = need
        self.chunk_bytes = chunk_bytes
        self.on_round = on_round
        self.participants: dict[int, int] = {}   # node id -> party id (fixed at enrolment)
        self.enrolment_nodes: set[int] = set()
        self.version = 0                         # last round whose aggregate was applied
        self.initial_eval_loss: float | None = None
        self.num_lora_values: int | None = None
        self.rounds: list[dict] = []
        self.events: list[dict] = []             # every exclusion, in order
        self._grid: Grid | None = None
        self._seen: set[bytes] = set()           # digests of every update accepted so far
        self._pending: dict | None = None        # the round's aggregate awaiting `evaluate`
        self._entry: dict = {}

    # -- bookkeeping ---------------------------------------------------------------------
    def _exclude(self, round_idx: int, stage: str, node: int, reason: str, *,
                 drop: bool = False) -> None:
        party = self.participants.get(node)
        event = {"round": round_idx, "stage": stage, "node": node, "party": party,
                 "reason": reason}
        if drop and node in self.participants:
            del self.participants[node]
            event["dropped"] = True
        self.events.append(event)
        self._entry.setdefault("excluded", []).append(event)
        log.warning("round %d, %s: excluded party %s (node %d)%s: %s", round_idx, stage,
                    party, node, ", dropped from the run" if drop else "", reason)

    def _messages(self, nodes: Iterable[int], message_type: str, content_fn) -> list[Message]:
        return [Message(content=content_fn(node), message_type=message_type, dst_node_id=node)
                for node in nodes]

    # -- enrolment -----------------------------------------------------------------------
    def enroll(self, grid: Grid, timeout: float) -> dict[int, int]:
        """Waits for the clients' nodes, asks each for its party id and context, and fixes
        the participants; a node that connects later is never sent work."""
        deadline = time.monotonic() + timeout
        while len(list(grid.get_node_ids())) < self.cfg.clients:
            if time.monotonic() > deadline:
                break
            time.sleep(0.5)
        nodes = sorted(grid.get_node_ids())
        self.enrolment_nodes = set(nodes)
        log.info("enrolling %d connected nodes (%d clients configured)", len(nodes),
                 self.cfg.clients)

        def content(_node):
            return RecordDict({"config": ConfigRecord({"clients": self.cfg.clients})})

        replies = grid.send_and_receive(self._messages(nodes, JOIN, content), timeout=timeout)
        self._entry = {"round": 0}
        losses = {}
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                self._exclude(0, "join", node, f"error: {msg.error.reason}")
                continue
            m = msg.content.metric_records.get("metrics")
            c = msg.content.config_records.get("config")
            try:
                party, fp = int(m["party"]), str(c["context-fp"])
                loss, version = float(m["eval-loss"]), int(m["version"])
            except (TypeError, KeyError, ValueError) as exc:
                self._exclude(0, "join", node, f"malformed join reply: {exc!r}")
                continue
            if not 0 <= party < self.cfg.clients:
                self._exclude(0, "join", node, f"party id {party} not in [0, {self.cfg.clients})")
            elif fp != self.server_ctx.fingerprint.hex():
                self._exclude(0, "join", node, "holds a key of another context")
            elif party in self.participants.values():
                self._exclude(0, "join", node, f"party id {party} claimed twice")
            elif version != 0:
                self._exclude(0, "join", node, f"holds state of round {version}, expected a "
                                               "fresh node")
            else:
                self.participants[node] = party
                losses[party] = loss
                if "num-lora-values" in m:
                    self.num_lora_values = int(m["num-lora-values"])
        self.join_events = self._entry.get("excluded", [])
        if losses:
            self.initial_eval_loss = losses[min(losses)]
            self._check_agreement(losses, "initial eval loss")
        log.info("participants (node -> party): %s", self.participants)
        return dict(self.participants)

    def late_nodes(self, grid: Grid) -> list[int]:
        """Connected nodes that are not participants (they joined after enrolment)."""
        late = sorted(set(grid.get_node_ids()) - self.enrolment_nodes)
        for node in late:
            log.warning("node %d connected after enrolment: not part of this run", node)
        return late

    @staticmethod
    def _check_agreement(losses: dict[int, float], what: str) -> float:
        spread = max(losses.values()) - min(losses.values())
        if spread > 1e-4:
            log.warning("%s differs across parties by %.3g (%s): their global states differ",
                        what, spread, losses)
        return spread

    # -- training ------------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._grid = grid
        self._pending = None
        self._entry = {"round": server_round, "status": "failed", "excluded": [],
                       "wall_start": time.perf_counter()}
        self.rounds.append(self._entry)
        nodes = sorted(self.participants)
        log.info("round %d: train on %d participants (global version %d)", server_round,
                 len(nodes), self.version)

        def content(_node):
            return RecordDict({"config": ConfigRecord({
                "round": server_round, "global-version": self.version})})

        return self._messages(nodes, "train", content)

    def _screen_train(self, server_round: int, replies: list[Message]):
        """Every check short of the native one, before any arithmetic."""
        ctx_fp = self.server_ctx.fingerprint
        candidates, answered, digests = [], set(), set()
        for msg in replies:
            node = msg.metadata.src_node_id
            if node not in self.participants:
                self._exclude(server_round, "train", node,
                              "not an enrolled participant (joined late?)")
                continue
            if node in answered:
                self._exclude(server_round, "train", node, "second reply in one round")
                continue
            answered.add(node)
            if msg.has_error():
                self._exclude(server_round, "train", node, f"error: {msg.error.reason}")
                continue
            try:
                metrics = msg.content.metric_records["metrics"]
                values = {k: float(metrics[k]) for k in TRAIN_METRICS}
                blob = get_payload(msg.content, UPDATE, STYPE_UPDATE)
                upd = EncryptedUpdate.from_bytes(blob)
            except (FedShieldError, KeyError, TypeError, ValueError) as exc:
                self._exclude(server_round, "train", node, f"invalid reply: {exc}")
                continue
            party = self.participants[node]
            digest = hashlib.sha256(blob).digest()
            if int(values["party"]) != party:
                reason = f"claims party {int(values['party'])}, enrolled as {party}"
            elif upd.round != server_round:
                reason = (f"update of round {upd.round} in round {server_round} "
                          "(a replay or a stale client)")
            elif digest in self._seen:
                reason = "replays an update already aggregated"
            elif digest in digests:
                reason = "the same update bytes as another reply of this round"
            elif upd.is_aggregate or upd.n_summed != 1:
                reason = "sent an aggregate, not a client update"
            elif upd.context_fingerprint != ctx_fp:
                reason = "update made under another context"
            else:
                candidates.append((node, party, blob, upd, values, digest))
                digests.add(digest)
                continue
            self._exclude(server_round, "train", node, reason)
        for node in sorted(set(self.participants) - answered):
            self._exclude(server_round, "train", node, "no reply before the timeout", drop=True)
        # Honest clients of one round agree on layout, mask and weight bound; the server
        # cannot compute the mask (it never sees the global state), so the majority sets them.
        groups = Counter((u.layout_fingerprint, u.mask_fingerprint, u.header["weight_bound"])
                         for _, _, _, u, _, _ in candidates)
        if not groups:
            return [], None
        (key, count), *rest = groups.most_common()
        if rest and rest[0][1] == count:
            for node, *_ in candidates:
                self._exclude(server_round, "train", node,
                              "no majority on layout/mask/weight bound among the replies")
            return [], None
        accepted = []
        for cand in candidates:
            u = cand[3]
            if (u.layout_fingerprint, u.mask_fingerprint, u.header["weight_bound"]) == key:
                accepted.append(cand)
            else:
                self._exclude(server_round, "train", cand[0],
                              "layout, mask or weight bound differs from the majority")
        return accepted, key[2]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        entry = self._entry
        accepted, weight_bound = self._screen_train(server_round, list(replies))
        if len(accepted) < self.min_clients:
            return self._fail(server_round, f"{len(accepted)} valid updates, "
                                            f"{self.min_clients} needed")
        rejected = set()

        def on_reject(index: int, exc: FedShieldError) -> None:
            rejected.add(index)
            self._exclude(server_round, "train", accepted[index][0], f"aggregate: {exc}")

        start = time.perf_counter()
        try:
            agg = aggregate(self.server_ctx, (c[2] for c in accepted), round=server_round,
                            weight_bound=weight_bound, on_reject=on_reject)
        except FedShieldError as exc:
            return self._fail(server_round, f"aggregation failed: {exc}")
        seconds_aggregate = time.perf_counter() - start
        accepted = [c for i, c in enumerate(accepted) if i not in rejected]
        if len(accepted) < self.min_clients:
            return self._fail(server_round, f"{len(accepted)} valid updates after native "
                                            f"validation, {self.min_clients} needed")
        accepted.sort(key=lambda c: c[1])
        self._seen.update(c[5] for c in accepted)
        parties = [c[1] for c in accepted]
        metrics = [c[4] for c in accepted]
        entry.update({
            "clients": parties,
            "train_loss": [m["train-loss"] for m in metrics],
            "bytes_up": [c[3].nbytes for c in accepted],
            "bytes_down": agg.nbytes,
            "kept_fraction": sum(m["kept"] for m in metrics) / len(metrics),
            "prune_ratio": metrics[0]["prune-ratio"],
            "lr": metrics[0]["lr"],
            "seconds": {"train": sum(m["seconds-train"] for m in metrics),
                        "prune": sum(m["seconds-prune"] for m in metrics),
                        "encrypt": sum(m["seconds-encrypt"] for m in metrics),
                        "aggregate": seconds_aggregate, "decrypt": 0.0},
        })
        shares: dict[int, bytes] = {}
        present = parties
        if self.cfg.keys == "threshold":
            present, shares = self._collect_shares(server_round, agg, parties)
            if not shares:
                return self._fail(server_round, "not enough partial decryptions")
        entry["decrypting_clients"] = present
        entry["bytes_partial_decryptions"] = sum(len(s) for s in shares.values())
        self._pending = {"round": server_round, "agg": agg, "shares": shares,
                         "present": present}
        record = RecordDict()
        put_payload(record, AGGREGATE, agg.to_bytes(), STYPE_AGGREGATE,
                    chunk_bytes=self.chunk_bytes)
        log.info("round %d: aggregated %d updates from parties %s (%d bytes) in %.3f s",
                 server_round, agg.n_summed, parties, agg.nbytes, seconds_aggregate)
        return record.array_records[AGGREGATE], MetricRecord({
            "train-loss": sum(entry["train_loss"]) / len(parties), "clients": len(parties)})

    def _fail(self, server_round: int, reason: str):
        self._entry["status"] = "failed"
        self._entry["failure"] = reason
        log.error("round %d failed: %s; the global adapter stays as it was", server_round, reason)
        self._finish_round()
        return None, None

    # -- threshold mode: partial decryptions -----------------------------------------------
    def _collect_shares(self, server_round: int, agg: EncryptedUpdate, parties: list[int]
                        ) -> tuple[list[int], dict[int, bytes]]:
        """Partial decryptions of ``agg`` from ``parties``; if some fail and at least t
        remain, once more with the others (each share depends on who is present)."""
        need = self.cfg.threshold or self.cfg.clients
        node_of = {p: n for n, p in self.participants.items()}
        present = sorted(p for p in parties if p in node_of)
        agg_bytes = agg.to_bytes()
        digest = _aggregate_digest(agg)
        for attempt in (1, 2):
            if len(present) < need:
                log.error("round %d: %d parties present, decryption needs %d", server_round,
                          len(present), need)
                return present, {}

            payload = RecordDict()  # one copy of the aggregate's chunks for every message
            put_payload(payload, AGGREGATE, agg_bytes, STYPE_AGGREGATE,
                        chunk_bytes=self.chunk_bytes)

            def content(_node, present=present, payload=payload):
                return RecordDict({**payload, "config": ConfigRecord({
                    "round": server_round, "present": present})})

            start = time.perf_counter()
            replies = self._grid.send_and_receive(
                self._messages([node_of[p] for p in present], SHARE_REQUEST, content),
                timeout=self.cfg.round_timeout)
            shares, failed, seconds = {}, [], []
            for msg in replies:
                node = msg.metadata.src_node_id
                party = self.participants.get(node)
                if party not in present or party in shares:
                    self._exclude(server_round, "share", node, "unexpected share reply")
                    continue
                try:
                    if msg.has_error():
                        raise InvalidUpdate(f"error: {msg.error.reason}")
                    blob = get_payload(msg.content, SHARE, STYPE_SHARE)
                    share = _Share(blob)
                    if share.party_id != party:
                        raise IncompatibleUpdate(f"share of party {share.party_id}")
                    if share.meta.get("aggregate") != digest:
                        raise IncompatibleUpdate("share of another aggregate")
                    if share.meta.get("present") != present:
                        raise IncompatibleUpdate(f"share made for present="
                                                 f"{share.meta.get('present')}")
                    seconds.append(float(msg.content.metric_records["metrics"]["seconds"]))
                except (FedShieldError, KeyError, TypeError, ValueError) as exc:
                    self._exclude(server_round, "share", node, str(exc))
                    failed.append(party)
                    continue
                shares[party] = blob
            for party in present:
                if party not in shares and party not in failed:
                    self._exclude(server_round, "share", node_of[party],
                                  "no share before the timeout", drop=True)
                    failed.append(party)
            if not failed:
                self._entry["seconds"]["decrypt"] += max(seconds, default=0.0)
                log.info("round %d: partial decryptions from parties %s in %.2f s (attempt %d)",
                         server_round, present, time.perf_counter() - start, attempt)
                return present, shares
            present = [p for p in present if p not in failed]
        return present, {}

    # -- apply + evaluate ----------------------------------------------------------------
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        pending = self._pending
        if pending is None or pending["round"] != server_round:
            return []  # the round failed: nothing to apply
        agg_bytes = pending["agg"].to_bytes()
        last = server_round == self.cfg.rounds
        writer = min(pending["present"])
        node_of = {p: n for n, p in self.participants.items()}

        payload = RecordDict()  # the aggregate and the shares, chunked once for every message
        put_payload(payload, AGGREGATE, agg_bytes, STYPE_AGGREGATE, chunk_bytes=self.chunk_bytes)
        for party, share in pending["shares"].items():
            put_payload(payload, share_key(party), share, STYPE_SHARE, chunk_bytes=self.chunk_bytes)

        def content(node):
            return RecordDict({**payload, "config": ConfigRecord({
                "round": server_round, "base-version": self.version,
                "present": pending["present"],
                "save-adapter": bool(last and self.participants[node] == writer)})})

        self._entry["adapter_writer"] = writer if last else None
        return self._messages(sorted(node_of.values()), "evaluate", content)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        if self._pending is None or self._pending["round"] != server_round:
            return None
        losses, decrypt, answered = {}, [], set()
        for msg in replies:
            node = msg.metadata.src_node_id
            if node not in self.participants or node in answered:
                self._exclude(server_round, "evaluate", node, "unexpected evaluate reply")
                continue
            answered.add(node)
            try:
                if msg.has_error():
                    raise ValueError(f"error: {msg.error.reason}")
                m = msg.content.metric_records["metrics"]
                loss, version = float(m["eval-loss"]), int(m["version"])
                decrypt.append(float(m["seconds-decrypt"]))
                if version != server_round or not math.isfinite(loss):
                    raise ValueError(f"reports version {version}, loss {loss}")
            except (KeyError, TypeError, ValueError) as exc:
                # its copy of the global adapter is now out of step: it cannot train on
                self._exclude(server_round, "evaluate", node, f"did not apply the aggregate: "
                                                            f"{exc}", drop=True)
                continue
            losses[self.participants[node]] = loss
        for node in sorted(set(self.participants) - answered):
            self._exclude(server_round, "evaluate", node, "no reply before the timeout",
                          drop=True)
        self.version = server_round
        entry = self._entry
        entry["seconds"]["decrypt"] += max(decrypt, default=0.0)
        if entry.get("adapter_writer") is not None:
            entry["adapter_written"] = entry["adapter_writer"] in losses
            if not entry["adapter_written"]:
                log.error("party %d was to write the adapter and did not reply",
                          entry["adapter_writer"])
        if losses:
            entry["eval_loss"] = losses[min(losses)]
            entry["eval_loss_spread"] = self._check_agreement(losses, "eval loss")
            entry["status"] = "ok"
        else:
            entry["eval_loss"] = None
            entry["failure"] = "no participant applied the aggregate"
        self._finish_round()
        return MetricRecord({"eval-loss": entry["eval_loss"]}) if losses else None

    def _finish_round(self) -> None:
        entry = self._entry
        entry["wall_seconds"] = round(time.perf_counter() - entry.pop("wall_start"), 4)
        if "seconds" in entry:
            entry["seconds"] = {k: round(v, 4) for k, v in entry["seconds"].items()}
        if self.on_round is not None:
            self.on_round(entry)
