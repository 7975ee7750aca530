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
from typing import Sequence

from flwr.clientapp import ClientApp
from flwr.common import ConfigRecord, Context, Message, RecordDict

from ...base.errors import FedShieldError
from .records import (AGGREGATE, FIELDS, SHARE, STYPE_AGGREGATE, STYPE_SHARE, STYPE_UPDATE,
                      UPDATE, get_blobs, get_payload, message_fields, put_blobs, put_payload,
                      route_logs_to_flower, share_key)
from .site_ipc import (NODE_SOCKET, SIMULATION_SITES, Relay, SiteWorkerError, WorkerRefused)

log = logging.getLogger("fedshield")
route_logs_to_flower()
app = ClientApp()

# How long one request may take at the worker (the first join loads the model and the data).
REQUEST_TIMEOUT = 3600.0
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
    try:
        return Relay.from_node_config(node_config(context)).request(
            op, fields, sections, timeout=REQUEST_TIMEOUT)
    except WorkerRefused:
        raise
    except FedShieldError as exc:
        log.error("fedshield relay: %s", exc)
        raise SiteWorkerError("RelayError: the site worker cannot be reached") from None


def _reply(msg: Message, fields: dict, payloads: dict[str, tuple[bytes, str]] = (),
           blobs: list[bytes] = ()) -> Message:
    content = RecordDict()
    for name, (blob, stype) in dict(payloads).items():
        put_payload(content, name, blob, stype)
    if blobs:
        fields = {**fields, "blobs": put_blobs(content, blobs)}
    content[FIELDS] = ConfigRecord(fields)
    return Message(content=content, reply_to=msg)


def _blobs(msg: Message, fields: dict) -> list[bytes]:
    return get_blobs(msg.content, fields.get("blobs", 0))


@app.query("join")
def join(msg: Message, context: Context) -> Message:
    """This site's party id, data sizes, context fingerprint and initial held-out loss (and,
    for a resumed run, the round of the adapter it holds). It hands the worker the run's
    settings (the run config), which the worker checks."""
    asked = message_fields(msg) if FIELDS in msg.content.config_records else {}
    run_config = {k: v for k, v in context.run_config.items() if k != SIMULATION_SITES}
    fields, _ = ask(context, "join", {**asked, "run-config": json.dumps(run_config)})
    return _reply(msg, fields)


def _relay(msg: Message, context: Context) -> Message:
    """A key set-up or catch-up operation, answered by the site worker as it is."""
    fields = message_fields(msg)
    out, sections = ask(context, str(fields.get("op")), fields, _blobs(msg, fields))
    return _reply(msg, out, blobs=sections)


@app.query("keys")
def keys(msg: Message, context: Context) -> Message:
    """One step of the key set-up (fedshield.fl.key_setup)."""
    return _relay(msg, context)


@app.query("catchup")
def catchup(msg: Message, context: Context) -> Message:
    """This party sends the global adapter sealed to a party that missed rounds, or takes it."""
    return _relay(msg, context)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Trains from the global adapter, prunes, encrypts and signs (in the site worker)."""
    fields, sections = ask(context, "train", message_fields(msg))
    return _reply(msg, {**fields, "signature": sections[1]},
                  {UPDATE: (sections[0], STYPE_UPDATE)})


@app.query("share")
def share(msg: Message, context: Context) -> Message:
    """Threshold keys: this party's signed partial decryption of the round's aggregate."""
    fields = message_fields(msg)
    agg = get_payload(msg.content, AGGREGATE, STYPE_AGGREGATE)
    out, sections = ask(context, "share", fields, [agg, *_blobs(msg, fields)])
    return _reply(msg, {**out, "signature": sections[1]}, {SHARE: (sections[0], STYPE_SHARE)})


@app.evaluate()
def apply_and_evaluate(msg: Message, context: Context) -> Message:
    """Decrypts the aggregate (threshold keys: fuses the shares), applies it, reports the loss."""
    fields = message_fields(msg)
    sections = [get_payload(msg.content, AGGREGATE, STYPE_AGGREGATE)]
    sections += [get_payload(msg.content, share_key(int(p)), STYPE_SHARE)
                 for p in fields.get("shares", [])]
    out, _ = ask(context, "evaluate", fields, sections + _blobs(msg, fields))
    return _reply(msg, out)
