"""EncryptedFedAvg: FedAvg's round structure over fedshield's Server.

Per round ``r`` (README, "Deployment on Flower"):

1. ``train``: every participant's site worker trains, prunes, encrypts and replies with its
   EncryptedUpdate.
2. :meth:`EncryptedFedAvg.aggregate_train` turns the replies into typed TrainReplys (a Flower
   error or an unreadable message becomes that node's exclusion), and the Server screens them
   all before any arithmetic and adds the accepted ones natively. Threshold keys: the Server
   then collects partial decryptions from the contributing parties (``query.share``).
3. ``evaluate``: every participant gets the aggregate (and the shares), decrypts it, applies
   it to its global adapter and reports its held-out loss.

The Server holds the public context only: it never decrypts and never imports openfhe.
This module only translates between Flower messages and the Server's typed messages.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Iterable

from flwr.common import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from ..errors import FedShieldError
from ..fl.messages import EvalReply, InvalidMessage, ShareReply, SiteInfo, TrainReply
from ..fl.server import Server
from ..he import EncryptedUpdate
from .records import (AGGREGATE, CHUNK_BYTES, FIELDS, JOIN, SHARE, SHARE_REQUEST,
                      STYPE_AGGREGATE, STYPE_SHARE, STYPE_UPDATE, UPDATE, get_payload,
                      message_fields, put_payload, share_key)

log = logging.getLogger("fedshield")


class EncryptedFedAvg(FedAvg):
    """FedAvg whose aggregation adds CKKS ciphertexts without any secret key (the Server)."""

    def __init__(self, server: Server, *, chunk_bytes: int = CHUNK_BYTES,
                 on_round: Callable[[dict], None] | None = None) -> None:
        if server.ctx is None:
            raise FedShieldError("the Flower engine runs encrypted aggregation only")
        need = server.min_updates
        super().__init__(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=need,
                         min_evaluate_nodes=need, min_available_nodes=need)
        self.server = server
        self.chunk_bytes = chunk_bytes
        self.on_round = on_round
        self.enrolment_nodes: set[int] = set()
        self._grid: Grid | None = None
        self._plan = None
        self._pending: dict | None = None        # the round's aggregate awaiting `evaluate`

    @property
    def participants(self) -> dict[int, int]:
        return self.server.participants

    @property
    def rounds(self) -> list:
        return self.server.record.rounds

    @property
    def events(self) -> list[dict]:
        return self.server.record.events

    def _messages(self, nodes: Iterable[int], message_type: str, content_fn) -> list[Message]:
        return [Message(content=content_fn(node), message_type=message_type, dst_node_id=node)
                for node in nodes]

    # -- enrolment -----------------------------------------------------------------------------
    def enroll(self, grid: Grid, timeout: float) -> dict[int, int]:
        """Waits for the sites' nodes, asks each who it is, and fixes the participants; a node
        that connects later is never sent work."""
        n_sites = self.server.cfg.n_sites
        deadline = time.monotonic() + timeout
        while len(list(grid.get_node_ids())) < n_sites and time.monotonic() < deadline:
            time.sleep(0.5)
        nodes = sorted(grid.get_node_ids())
        self.enrolment_nodes = set(nodes)
        log.info("enrolling %d connected nodes (%d sites configured)", len(nodes), n_sites)
        replies = grid.send_and_receive(
            self._messages(nodes, JOIN, lambda _node: RecordDict()), timeout=timeout)
        joins = []
        for msg in replies:
            node = msg.metadata.src_node_id
            try:
                if msg.has_error():
                    raise InvalidMessage(f"error: {msg.error.reason}")
                fields = message_fields(msg)
                info = SiteInfo.from_fields(fields)
                version = fields.get("version")
            except FedShieldError as exc:
                self.server.exclude(0, "join", node, f"malformed join reply: {exc}")
                continue
            if version != 0:
                self.server.exclude(0, "join", node, f"holds state of round {version}, "
                                    "expected a fresh node", party=info.party)
                continue
            joins.append((node, info))
        return self.server.enrol(joins)

    def late_nodes(self, grid: Grid) -> list[int]:
        """Connected nodes that are not participants (they joined after enrolment)."""
        late = sorted(set(grid.get_node_ids()) - self.enrolment_nodes)
        for node in late:
            log.warning("node %d connected after enrolment: not part of this run", node)
        return late

    # -- training ------------------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._grid = grid
        self._pending = None
        self._plan = self.server.plan(server_round)
        fields = self._plan.to_fields()
        return self._messages(sorted(self.participants), "train",
                              lambda _node: RecordDict({FIELDS: ConfigRecord(fields)}))

    @staticmethod
    def _train_reply(msg: Message) -> TrainReply | FedShieldError:
        if msg.has_error():
            return InvalidMessage(f"error: {msg.error.reason}")
        try:
            return TrainReply.from_fields(message_fields(msg),
                                          get_payload(msg.content, UPDATE, STYPE_UPDATE))
        except FedShieldError as exc:
            return InvalidMessage(f"invalid reply: {exc}")

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server, plan = self.server, self._plan
        parsed = [(msg.metadata.src_node_id, self._train_reply(msg)) for msg in replies]
        accepted = server.screen_updates(plan, parsed)
        agg = server.aggregate(plan, accepted)
        if agg is None:
            return self._round_done(None)
        shares: dict[int, bytes] = {}
        present = [reply.party for _, reply in accepted]
        if server.cfg.keys.mode == "threshold":
            collected = server.collect_shares(agg, present, self._ask_shares(agg))
            if collected is None:
                return self._round_done(None)
            present, shares = collected
        self._pending = {"agg": agg, "shares": shares, "present": present}
        record = RecordDict()
        put_payload(record, AGGREGATE, agg.to_bytes(), STYPE_AGGREGATE,
                    chunk_bytes=self.chunk_bytes)
        entry = server.current
        return record.array_records[AGGREGATE], MetricRecord({
            "train-loss": sum(entry.train_loss) / len(entry.train_loss),
            "clients": len(entry.clients)})

    def _ask_shares(self, agg: EncryptedUpdate):
        """The transport of Server.collect_shares: one query.share per present party."""
        def ask(present: list[int]) -> dict[int, object]:
            payload = RecordDict()  # one copy of the aggregate's chunks for every message
            put_payload(payload, AGGREGATE, agg.to_bytes(), STYPE_AGGREGATE,
                        chunk_bytes=self.chunk_bytes)
            fields = {"round": agg.round, "present": present}
            nodes = [self.server.node_of(p) for p in present]
            replies = self._grid.send_and_receive(
                self._messages(nodes, SHARE_REQUEST, lambda _node: RecordDict(
                    {**payload, FIELDS: ConfigRecord(fields)})),
                timeout=self.server.cfg.engine.round_timeout)
            answers: dict[int, object] = {}
            seconds = []
            for msg in replies:
                party = self.participants.get(msg.metadata.src_node_id)
                if party not in present or party in answers:
                    self.server.exclude(agg.round, "share", msg.metadata.src_node_id,
                                        "unexpected share reply")
                    continue
                try:
                    if msg.has_error():
                        raise InvalidMessage(f"error: {msg.error.reason}")
                    reply = ShareReply.from_fields(message_fields(msg),
                                                   get_payload(msg.content, SHARE, STYPE_SHARE))
                except FedShieldError as exc:
                    answers[party] = exc
                    continue
                answers[party] = reply.share
                seconds.append(reply.seconds)
            self.server.current.seconds["decrypt"] += max(seconds, default=0.0)
            return answers
        return ask

    # -- apply + evaluate ----------------------------------------------------------------------
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        pending = self._pending
        if pending is None:
            return []  # the round failed: nothing to apply
        last = server_round == self.server.cfg.training.rounds
        writer = min(pending["present"])
        payload = RecordDict()  # the aggregate and the shares, chunked once for every message
        put_payload(payload, AGGREGATE, pending["agg"].to_bytes(), STYPE_AGGREGATE,
                    chunk_bytes=self.chunk_bytes)
        for party, share in pending["shares"].items():
            put_payload(payload, share_key(party), share, STYPE_SHARE,
                        chunk_bytes=self.chunk_bytes)
        fields = {**self._plan.to_fields(), "clients": list(self.server.current.clients),
                  "shares": sorted(pending["shares"]), "final": last}

        def content(node):
            return RecordDict({**payload, FIELDS: ConfigRecord({
                **fields, "save-adapter": bool(last and self.participants[node] == writer)})})

        pending["writer"] = writer if last else None
        return self._messages(sorted(self.participants), "evaluate", content)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        if self._pending is None:
            return None
        evals = []
        for msg in replies:
            node = msg.metadata.src_node_id
            try:
                if msg.has_error():
                    raise InvalidMessage(f"error: {msg.error.reason}")
                evals.append((node, EvalReply.from_fields(message_fields(msg))))
            except FedShieldError as exc:
                evals.append((node, exc))
        entry = self.server.finish_round(evals)
        writer = self._pending.get("writer")
        if writer is not None and writer not in [r.party for _, r in evals
                                                 if isinstance(r, EvalReply)]:
            log.error("party %d was to write the adapter and did not reply", writer)
        self._round_done(entry)
        return MetricRecord({"eval-loss": entry.eval_loss}) if entry.eval_loss is not None \
            else None

    def _round_done(self, entry):
        if self.on_round is not None:
            self.on_round(self.server.current.to_dict())
        return None, None
