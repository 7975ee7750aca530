"""The round protocol's Flower transport: requests out through the Grid, replies back as typed
messages (fedshield.fl.protocol). It carries; fedshield.fl.rounds decides.

Every request travels as one Flower message: its fields in the ``FIELDS`` ConfigRecord (with
``op`` and the count of byte strings) and its byte strings as chunked payloads
(fedshield.engines.flower.records). A byte string sent to several nodes (the aggregate, the
shares, the provenance) is chunked once. Every reply goes through :func:`triage`: a Flower
error or an unreadable message becomes that node's InvalidMessage, which the Server records as
its exclusion.

The ServerApp's loop is driven by the Grid: enrolment (:meth:`GridTransport.enroll`), then
fedshield.fl.rounds.RoundDriver with :meth:`GridTransport.send` as its transport.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Mapping

from flwr.common import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from ...base.errors import FedShieldError
from ...fl.messages import InvalidMessage, SiteInfo
from ...fl.protocol import TRAIN
from ...fl.server import Server
from .reasons import reason_text
from .records import CHUNK_BYTES, FIELDS, get_blobs, message_fields, put_blobs

log = logging.getLogger("fedshield")

JOIN = "join"


def message_type(op: str) -> str:
    """The Flower message type of a request: ``train`` for the round's train request, else a
    query named after the op's family (join, share, catchup, keys)."""
    return TRAIN if op == TRAIN else f"query.{op.split('.')[0]}"


def triage(msg: Message, parse: Callable[[dict, list[bytes]], object]) -> object:
    """A node's reply as its typed message (``parse(fields, blobs)``), or the InvalidMessage
    that says why it is not one: a Flower error, missing records, a corrupted payload or a
    malformed field."""
    if msg.has_error():
        return InvalidMessage(f"error: {reason_text(msg.error.reason)}")
    try:
        fields = message_fields(msg)
        blobs = get_blobs(msg.content, fields.pop("blobs", 0))
        return parse(fields, blobs)
    except FedShieldError as exc:
        return InvalidMessage(f"invalid reply: {exc}")


class GridTransport:
    """Sends the round protocol's requests to the participants' nodes through ``grid``."""

    def __init__(self, grid: Grid, server: Server, *, chunk_bytes: int = CHUNK_BYTES,
                 timeout: float | None = None) -> None:
        if not server.cfg.he.enabled:
            raise FedShieldError("the Flower engine runs encrypted aggregation only")
        self.grid = grid
        self.server = server
        self.chunk_bytes = chunk_bytes
        self.timeout = server.cfg.engine.round_timeout if timeout is None else timeout
        self.enrolment_nodes: set[int] = set()

    def message(self, node: int, op: str, fields: Mapping, blobs, cache: dict) -> Message:
        content = RecordDict()
        count = put_blobs(content, blobs, chunk_bytes=self.chunk_bytes, cache=cache)
        content[FIELDS] = ConfigRecord({**fields, "op": op, "blobs": count})
        return Message(content=content, message_type=message_type(op), dst_node_id=node)

    def send(self, requests: Mapping[int, object]) -> list[tuple[int, object]]:
        """One message step: each node's request, and every reply that came before the
        timeout, parsed (a node that did not reply is absent)."""
        cache: dict = {}     # one chunking of each byte string, whatever its recipients
        messages = []
        for node, request in requests.items():
            fields, blobs = request.to_wire()
            messages.append(self.message(node, request.op, fields, blobs, cache))
        some = next(iter(requests.values()))
        out = []
        for msg in self.grid.send_and_receive(messages, timeout=self.timeout):
            node = msg.metadata.src_node_id
            out.append((node, triage(msg, requests.get(node, some).reply_from_wire)))
        return out

    # -- enrolment -----------------------------------------------------------------------------
    def enroll(self, timeout: float) -> dict[int, int]:
        """Waits for the sites' nodes, asks each who it is, and fixes the participants; a node
        that connects later is never sent work."""
        server, grid = self.server, self.grid
        n_sites = server.cfg.n_sites
        deadline = time.monotonic() + timeout
        while len(list(grid.get_node_ids())) < n_sites and time.monotonic() < deadline:
            time.sleep(0.5)
        nodes = sorted(grid.get_node_ids())
        self.enrolment_nodes = set(nodes)
        log.info("enrolling %d connected nodes (%d sites configured)", len(nodes), n_sites)
        resumed = server.restored_roster is not None
        cache: dict = {}
        join = {"resume": True, "resume-from": server.version} if resumed else {"resume": False}
        messages = [self.message(node, JOIN, join, [], cache) for node in nodes]
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
                server.exclude(0, "join", node,
                               f"refused to join: {reason_text(msg.error.reason)}")
                continue
            got = triage(msg, lambda fields, _: (SiteInfo.from_fields(fields), fields))
            if isinstance(got, FedShieldError):
                server.exclude(0, "join", node, f"malformed join reply: {got}")
                continue
            info, fields = got
            version = fields.get("version")
            if not isinstance(version, int) or isinstance(version, bool) or version < 0 or (
                    not resumed and version != 0):
                server.exclude(0, "join", node, f"holds state of round {version}, "
                               "expected a fresh node", party=info.party)
                continue
            joins.append((node, info))
            versions[info.party] = version
            fingerprints[info.party] = str(fields.get("adapter-fp", ""))
        return server.enrol(joins, versions, fingerprints)

    def late_nodes(self) -> list[int]:
        """Connected nodes that are not participants (they joined after enrolment)."""
        late = sorted(set(self.grid.get_node_ids()) - self.enrolment_nodes)
        for node in late:
            log.warning("node %d connected after enrolment: not part of this run", node)
        return late
