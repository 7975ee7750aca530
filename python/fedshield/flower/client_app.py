"""The fedshield ClientApp: a thin relay between Flower and the node's site worker.

Each message is handed to the node's long-lived site worker (fedshield.flower.site_worker),
started on the node's first message, which holds the Site: its own data, model, key and copy
of the global adapter. This process imports neither torch nor openfhe, so the per-message
ClientApp process Flower 1.30 starts stays cheap.

Node config (``flower-supernode --node-config``): ``data`` (this site's own data file),
``key-file`` (where the key set-up writes its context, mode 0600), ``party-id`` (0..sites-1),
and optionally ``identity-file`` (its long-term identity key, made on first start; default
the key file's path + ``.identity``), ``model`` (its own model directory), ``eval-data`` (its
own held-out file instead of a held-out part of ``data``), ``name``, ``columns``, ``out-dir``
(where the adapter goes when the server asks this node to write it) and
``worker-idle-timeout``.
Run config: ``fedshield-config`` (the run config as JSON); on the simulation runtime also
``simulation-sites`` (each virtual SuperNode's node config, by partition id).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from flwr.clientapp import ClientApp
from flwr.common import ConfigRecord, Context, Message, RecordDict

from .records import (AGGREGATE, FIELDS, SHARE, STYPE_AGGREGATE, STYPE_SHARE, STYPE_UPDATE,
                      UPDATE, get_blobs, get_payload, message_fields, put_blobs, put_payload,
                      route_logs_to_flower, share_key)
from .site_ipc import SIMULATION_SITES, ensure_worker, request

route_logs_to_flower()
app = ClientApp()

# How long a node's first message waits for its site worker to load the model and data.
WORKER_START_TIMEOUT = 600.0


def node_config(context: Context) -> dict:
    """This site's node config. On Flower's simulation runtime a virtual SuperNode's node
    config holds only its ``partition-id``: the run config's ``simulation-sites`` (a JSON list)
    holds each site's by partition id."""
    node = dict(context.node_config)
    sites = context.run_config.get(SIMULATION_SITES)
    if "data" not in node and sites and "partition-id" in node:
        node = json.loads(str(sites))[int(node["partition-id"])]
    return node


def worker(context: Context) -> Path:
    """The socket of this node's site worker (started, or waited for, when needed)."""
    return ensure_worker(node_config(context), dict(context.run_config), os.getppid(),
                         WORKER_START_TIMEOUT)


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
    for a resumed run, the round of the adapter it holds)."""
    asked = message_fields(msg) if FIELDS in msg.content.config_records else {}
    fields, _ = request(worker(context), "join", asked)
    return _reply(msg, fields)


def _relay(msg: Message, context: Context) -> Message:
    """A key set-up or catch-up operation, answered by the site worker as it is."""
    fields = message_fields(msg)
    out, sections = request(worker(context), str(fields.get("op")), fields, _blobs(msg, fields))
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
    fields, sections = request(worker(context), "train", message_fields(msg))
    return _reply(msg, {**fields, "signature": sections[1]},
                  {UPDATE: (sections[0], STYPE_UPDATE)})


@app.query("share")
def share(msg: Message, context: Context) -> Message:
    """Threshold keys: this party's signed partial decryption of the round's aggregate."""
    fields = message_fields(msg)
    agg = get_payload(msg.content, AGGREGATE, STYPE_AGGREGATE)
    out, sections = request(worker(context), "share", fields, [agg, *_blobs(msg, fields)])
    return _reply(msg, {**out, "signature": sections[1]}, {SHARE: (sections[0], STYPE_SHARE)})


@app.evaluate()
def apply_and_evaluate(msg: Message, context: Context) -> Message:
    """Decrypts the aggregate (threshold keys: fuses the shares), applies it, reports the loss."""
    fields = message_fields(msg)
    sections = [get_payload(msg.content, AGGREGATE, STYPE_AGGREGATE)]
    sections += [get_payload(msg.content, share_key(int(p)), STYPE_SHARE)
                 for p in fields.get("shares", [])]
    out, _ = request(worker(context), "evaluate", fields, sections + _blobs(msg, fields))
    return _reply(msg, out)
