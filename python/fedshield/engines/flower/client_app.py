"""The fedshield ClientApp: it relays each of the server's requests to the site's own worker.

Flower ships this module to every SuperNode in the app package (FAB), so a site does not trust
it. It holds nothing of the site's: the site starts its worker itself
(``fedshield site worker --config SITE.toml``), and the SuperNode's node config names only how
to reach it: ``socket`` (the worker's Unix socket) and ``token-file`` (a copy of the worker's
relay secret), e.g. ``--node-config 'socket="/run/fedshield/a/worker.sock"
token-file="/home/flwr/site-a.token"'``. The worker answers the protocol's requests only
(fedshield.engines.flower.site_worker); what it answers is what goes back to the server. This process
imports neither torch nor openfhe, so the per-message ClientApp process Flower 1.30 starts
stays cheap.

On the simulation runtime a virtual SuperNode's node config holds only its ``partition-id``:
the run config's ``simulation-sites`` (a JSON list) holds each site's ``socket`` and
``token-file``.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Sequence

from flwr.clientapp import ClientApp
from flwr.common import ConfigRecord, Context, Message, RecordDict

from ...base.errors import FedShieldError
from .records import (FIELDS, get_blobs, message_fields, put_blobs, route_logs_to_flower)
from .site_ipc import (NODE_SOCKET, SIMULATION_SITES, Relay, SiteWorkerError, WorkerRefused)

log = logging.getLogger("fedshield")
app = ClientApp()

# How long one request may take at the worker (the first join loads the model and the data).
REQUEST_TIMEOUT = 3600.0
# A run's join may reach a SuperNode before its site worker listens (`fedshield run --engine
# flower` starts the worker and Flower side by side; the worker imports torch first): the relay
# waits for the worker's token and socket this long, looking every JOIN_POLL seconds. Every
# other request fails at once when the worker cannot be reached.
JOIN_WAIT, JOIN_POLL = 300.0, 0.1
# What the ClientApp itself adds to the server's fields: not for the worker.
RELAY_FIELDS = ("op", "blobs")


def node_config(context: Context) -> dict:
    """This SuperNode's relay settings. On Flower's simulation runtime a virtual SuperNode's
    node config holds only its ``partition-id``: the run config's ``simulation-sites`` (a JSON
    list) holds each site's by partition id."""
    node = dict(context.node_config)
    sites = context.run_config.get(SIMULATION_SITES)
    if NODE_SOCKET not in node and sites and "partition-id" in node:
        node = json.loads(str(sites))[int(node["partition-id"])]
    return node


def ask(context: Context, op: str, fields: dict, sections: Sequence[bytes] = ()
        ) -> tuple[dict, list[bytes]]:
    """One request to this node's site worker. What fails here (no token, no socket) is logged
    on this node and leaves it as a fixed message."""
    fields = {k: v for k, v in fields.items() if k not in RELAY_FIELDS}
    deadline = time.monotonic() + (JOIN_WAIT if op == "join" else 0.0)
    while True:
        try:
            return Relay.from_node_config(node_config(context)).request(
                op, fields, sections, timeout=REQUEST_TIMEOUT)
        except WorkerRefused:
            raise
        except FedShieldError as exc:
            if _not_started(exc) and time.monotonic() < deadline:
                time.sleep(JOIN_POLL)
                continue
            log.error("fedshield relay: %s", exc)
            raise SiteWorkerError("RelayError: the site worker cannot be reached") from None


def _not_started(exc: FedShieldError) -> bool:
    """Whether the worker has not started yet: no token file or socket, or nobody listening
    on it."""
    return isinstance(exc.__cause__, (FileNotFoundError, ConnectionRefusedError))


def request_of(msg: Message) -> tuple[str, dict, list[bytes]]:
    """The op, fields and byte strings of a server's message. The op is in the fields, or
    (a join or a plain train request) named by the message type."""
    fields = message_fields(msg) if FIELDS in msg.content.config_records else {}
    kind = msg.metadata.message_type
    op = fields.pop("op", None) or kind.removeprefix("query.")
    return str(op), fields, get_blobs(msg.content, fields.pop("blobs", 0))


def relay(msg: Message, context: Context) -> Message:
    """Every request of the server (join, the round's train request, share, catch-up, a key
    set-up step) to this site's worker, and its answer back as it is. A join also hands the
    worker the run's settings (the run config), which the worker checks."""
    route_logs_to_flower()   # in the ClientApp process only, not on import
    op, fields, blobs = request_of(msg)
    if op == "join":
        run_config = {k: v for k, v in context.run_config.items() if k != SIMULATION_SITES}
        fields["run-config"] = json.dumps(run_config)
    out, sections = ask(context, op, fields, blobs)
    content = RecordDict()
    count = put_blobs(content, sections)
    content[FIELDS] = ConfigRecord({**out, "blobs": count})
    return Message(content=content, reply_to=msg)


for _register in (app.train(), app.query("join"), app.query("share"), app.query("catchup"),
                  app.query("keys")):
    _register(relay)
