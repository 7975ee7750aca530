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

from ...base.errors import FedShieldError
from ...trust.federation import run_settings
from ...fl.key_setup import KeySetup
from ...fl.messages import EvalReply, InvalidMessage, ShareReply, SiteInfo, TrainReply
from ...fl.server import Server
from ...he import Context, EncryptedUpdate
from .reasons import reason_text
from .records import (AGGREGATE, CATCHUP, CHUNK_BYTES, FIELDS, JOIN, KEYS, SHARE,
                      SHARE_REQUEST, STYPE_AGGREGATE, STYPE_SHARE, STYPE_UPDATE, UPDATE,
                      get_blobs, get_payload, message_fields, put_blobs, put_payload, share_key)

log = logging.getLogger("fedshield")


class EncryptedFedAvg(FedAvg):
    """FedAvg whose aggregation adds CKKS ciphertexts without any secret key (the Server)."""

    def __init__(self, server: Server, *, chunk_bytes: int = CHUNK_BYTES,
                 on_round: Callable[[dict], None] | None = None,
                 on_keys: Callable[[Context], None] | None = None) -> None:
        if not server.cfg.he.enabled:
            raise FedShieldError("the Flower engine runs encrypted aggregation only")
        need = server.min_updates
        super().__init__(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=need,
                         min_evaluate_nodes=need, min_available_nodes=need)
        self.server = server
        self.chunk_bytes = chunk_bytes
        self.on_round = on_round
        self.on_keys = on_keys          # called with each key epoch's public context
        self.enrolment_nodes: set[int] = set()
        self._grid: Grid | None = None
        self._plan = None
        self._pending: dict | None = None        # the round's aggregate awaiting `evaluate`
        self.first_round = 1     # a resumed run's Flower round 1 is the run's round k + 1

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
        messages = self._messages(nodes, JOIN, lambda _node: RecordDict({FIELDS: ConfigRecord(
            {"resume": self.server.restored_roster is not None})}))
        # the key set-up needs every site: one that refuses ends the run, so stop waiting
        # for the others (a model can take minutes to load); a plain Grid waits for all
        send_until = getattr(grid, "send_until", None)
        replies = (send_until(messages, timeout=timeout, stop=Message.has_error)
                   if send_until is not None else
                   grid.send_and_receive(messages, timeout=timeout))
        joins, versions, fingerprints = [], {}, {}
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():   # e.g. a site that failed its start-up checks says which
                self.server.exclude(0, "join", node,
                                    f"refused to join: {reason_text(msg.error.reason)}")
                continue
            try:
                fields = message_fields(msg)
                info = SiteInfo.from_fields(fields)
                version = fields.get("version")
            except FedShieldError as exc:
                self.server.exclude(0, "join", node, f"malformed join reply: {exc}")
                continue
            resumed = self.server.restored_roster is not None
            if not isinstance(version, int) or isinstance(version, bool) or version < 0 or (
                    not resumed and version != 0):
                self.server.exclude(0, "join", node, f"holds state of round {version}, "
                                    "expected a fresh node", party=info.party)
                continue
            joins.append((node, info))
            versions[info.party] = version
            fingerprints[info.party] = str(fields.get("adapter-fp", ""))
        return self.server.enrol(joins, versions, fingerprints)

    def late_nodes(self, grid: Grid) -> list[int]:
        """Connected nodes that are not participants (they joined after enrolment)."""
        late = sorted(set(grid.get_node_ids()) - self.enrolment_nodes)
        for node in late:
            log.warning("node %d connected after enrolment: not part of this run", node)
        return late

    # -- training ------------------------------------------------------------------------------
    def run_round(self, server_round: int) -> int:
        """The run's round number of Flower's ``server_round``."""
        return self.first_round + server_round - 1

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._grid = grid
        self._pending = None
        r = self.run_round(server_round)
        if self.server.needs_new_keys():  # the first key epoch, or a rotation (budget)
            self.set_up_keys(grid, before_round=r)
        self.catch_up(grid, before_round=r)
        self._plan = self.server.plan(r)
        fields = self._plan.to_fields()
        return self._messages(sorted(self.participants), "train",
                              lambda _node: RecordDict({FIELDS: ConfigRecord(fields)}))

    @staticmethod
    def _train_reply(msg: Message) -> TrainReply | FedShieldError:
        if msg.has_error():
            return InvalidMessage(f"error: {msg.error.reason}")
        try:
            fields = message_fields(msg)
            signature = fields.pop("signature", None)
            if not isinstance(signature, bytes):
                raise InvalidMessage("the update comes without its signed record")
            return TrainReply.from_fields(fields, get_payload(msg.content, UPDATE, STYPE_UPDATE),
                                          signature=signature)
        except FedShieldError as exc:
            return InvalidMessage(f"invalid reply: {exc}")

    # -- keys ----------------------------------------------------------------------------------
    def set_up_keys(self, grid: Grid, before_round: int) -> None:
        """A key epoch by the protocol (fedshield.fl.key_setup) over ``query.keys`` messages:
        the first one, or a rotation when a key's decryption budget runs low. A party that
        fails it stops the run (KeySetupError naming the party)."""
        server = self.server
        cfg = server.cfg
        epoch = server.epoch + 1
        result = KeySetup(cfg.ckks_params(), cfg.keys.mode, cfg.keys.threshold or cfg.n_sites,
                          server.roster, server.identity.public,
                          self._relay(grid, KEYS), settings=run_settings(cfg)).run(epoch)
        server.key_epoch_done(epoch, result.context, before_round, result.seconds,
                              result.subsets_checked, result.message_steps)
        if self.on_keys is not None:
            self.on_keys(result.context)

    def _relay(self, grid: Grid, message_type: str):
        """``ask(op, {party: (fields, blobs)})`` over ``message_type`` messages to the parties'
        site workers: their answers, or the error each one raised."""
        def ask(op: str, requests) -> dict[int, object]:
            messages = []
            for party, (fields, blobs) in requests.items():
                node = self.server.node_of(party)
                if node is None:
                    continue
                content = RecordDict()
                count = put_blobs(content, blobs, chunk_bytes=self.chunk_bytes)
                content[FIELDS] = ConfigRecord({**fields, "op": op, "blobs": count})
                messages.append(Message(content=content, message_type=message_type,
                                        dst_node_id=node))
            answers: dict[int, object] = {}
            for msg in grid.send_and_receive(messages,
                                             timeout=self.server.cfg.engine.round_timeout):
                party = self.participants.get(msg.metadata.src_node_id)
                if party not in requests or party in answers:
                    continue
                try:
                    if msg.has_error():
                        raise InvalidMessage(f"error: {msg.error.reason}")
                    fields = message_fields(msg)
                    answers[party] = (fields, get_blobs(msg.content, fields.pop("blobs", 0)))
                except FedShieldError as exc:
                    answers[party] = exc
            return answers
        return ask

    def catch_up(self, grid: Grid, before_round: int) -> None:
        """Parties behind the current global adapter get it from one that holds it, sealed to
        them (``catchup.send`` to the source, ``catchup.take`` to each behind party; the
        server relays what it cannot read). A party that cannot take it leaves the run."""
        server = self.server
        behind = server.behind()
        if not behind:
            return
        source = server.catch_up_source()
        if source is None:
            for party in behind:
                server.catch_up_failed(party, before_round, "no participant holds the global "
                                       f"adapter of round {server.version}")
            return
        ask = self._relay(grid, CATCHUP)
        sent = ask("catchup.send", {source: ({"version": server.version, "to": behind}, [])})
        answer = sent.get(source)
        if not isinstance(answer, tuple) or len(answer[1]) != len(behind):
            for party in behind:
                server.catch_up_failed(party, before_round, f"party {source} did not send the "
                                       f"adapter of round {server.version}: {answer}")
            return
        took = ask("catchup.take", {p: ({"version": server.version, "from": source}, [blob])
                                    for p, blob in zip(behind, answer[1])})
        for party in behind:
            got = took.get(party)
            if isinstance(got, tuple) and got[0].get("version") == server.version:
                server.caught_up(party, source, before_round, str(got[0].get("adapter-fp", "")))
            else:
                server.catch_up_failed(party, before_round, "could not take the global "
                                       f"adapter of round {server.version}: "
                                       f"{got if got is not None else 'no reply'}")

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
        losses = [x for x in entry.train_loss if x is not None]  # the sites' policies decide
        summary = {"clients": len(entry.clients)}
        if losses:
            summary["train-loss"] = sum(losses) / len(losses)
        return record.array_records[AGGREGATE], MetricRecord(summary)

    def _ask_shares(self, agg: EncryptedUpdate):
        """The transport of Server.collect_shares: one query.share per present party, with
        the aggregate's manifest (and, verify_aggregates, its signed updates)."""
        def ask(present: list[int]) -> dict[int, object]:
            payload = RecordDict()  # one copy of the aggregate's chunks for every message
            put_payload(payload, AGGREGATE, agg.to_bytes(), STYPE_AGGREGATE,
                        chunk_bytes=self.chunk_bytes)
            count = put_blobs(payload, self.server.provenance.to_blobs(),
                              chunk_bytes=self.chunk_bytes)
            fields = {"round": agg.round, "present": present, "blobs": count}
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
                    fields = message_fields(msg)
                    reply = ShareReply.from_fields(fields,
                                                   get_payload(msg.content, SHARE, STYPE_SHARE),
                                                   signature=fields.get("signature"))
                except FedShieldError as exc:
                    answers[party] = exc
                    continue
                answers[party] = (reply.share, reply.signature)
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
        last = self.run_round(server_round) == self.server.cfg.training.rounds
        writer = min(pending["present"])
        payload = RecordDict()  # the aggregate and the shares, chunked once for every message
        put_payload(payload, AGGREGATE, pending["agg"].to_bytes(), STYPE_AGGREGATE,
                    chunk_bytes=self.chunk_bytes)
        for party, share in pending["shares"].items():
            put_payload(payload, share_key(party), share, STYPE_SHARE,
                        chunk_bytes=self.chunk_bytes)
        server = self.server
        sharers = sorted(pending["shares"])
        count = put_blobs(payload, [*(server.share_records[p] for p in sharers),
                                    *server.provenance.to_blobs()],
                          chunk_bytes=self.chunk_bytes)
        fields = {**self._plan.to_fields(), "clients": list(self.server.current.clients),
                  "shares": sharers, "final": last, "blobs": count}

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
