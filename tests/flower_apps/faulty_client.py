"""A fedshield ClientApp that misbehaves on purpose (tests/test_flower.py ships it in the FAB).

Node config ``fault``: comma-separated ``KIND@ROUND`` entries, KIND one of
garbage (random bytes as the update), replay (this party's update of the previous round),
raise (the ClientApp raises), exit (the ClientApp process dies), sleep (replies too late),
all on the train request of that round; and miss-eval (the ClientApp raises on the request
that carries that round's aggregate: the site never applies it, so it is behind until it
catches up).
"""

import os
import time

from flwr.clientapp import ClientApp
from flwr.common import ConfigRecord

from fedshield.engines.flower import client_app as real
from fedshield.engines.flower.records import (FIELDS, STYPE_UPDATE, get_blobs, get_payload,
                                              message_fields, put_blobs, put_payload)

app = ClientApp()
LAST = "faults.last-update"
LAST_SIGNATURE = "faults.last-signature"


def _fault(context, round_idx):
    spec = str(context.node_config.get("fault", ""))
    for item in filter(None, spec.split(",")):
        kind, _, at = item.partition("@")
        if int(at) == round_idx:
            return kind
    return None


def relay(msg, context):
    if msg.metadata.message_type != "train":
        return real.relay(msg, context)
    fields = message_fields(msg)
    if _fault(context, fields.get("apply.round")) == "miss-eval":
        raise RuntimeError("injected crash before applying the aggregate")
    fault = _fault(context, fields.get("round"))
    if fault == "raise":
        raise RuntimeError("injected crash")
    if fault == "exit":
        os._exit(3)
    if fault == "sleep":
        time.sleep(float(context.node_config.get("sleep", 120)))
    reply = real.relay(msg, context)
    out = reply.content[FIELDS]
    if "round" not in out:      # applied the aggregate only: no update to tamper with
        return reply
    blob, signature = get_blobs(reply.content, out["blobs"])
    if fault == "garbage":
        put_blobs(reply.content, [os.urandom(len(blob)), signature])
    elif fault == "replay" and LAST in context.state.array_records:
        # the previous round's update with its own signed record, as a replaying relay would
        put_blobs(reply.content, [get_payload(context.state, LAST, STYPE_UPDATE),
                                  context.state[LAST_SIGNATURE]["signature"]])
    put_payload(context.state, LAST, blob, STYPE_UPDATE)
    context.state[LAST_SIGNATURE] = ConfigRecord({"signature": signature})
    return reply


for _register in (app.train(), app.query("join"), app.query("share"), app.query("catchup"),
                  app.query("keys")):
    _register(relay)
