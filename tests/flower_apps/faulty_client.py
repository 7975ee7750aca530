"""A fedshield ClientApp that misbehaves on purpose (tests/test_flower.py ships it in the FAB).

Node config ``fault``: comma-separated ``KIND@ROUND`` entries, KIND one of
garbage (random bytes as the update), replay (this party's update of the previous round),
raise (the ClientApp raises), exit (the ClientApp process dies), sleep (replies too late),
miss-eval (the ClientApp raises on that round's evaluate message: the site never applies that
aggregate, so it is behind until it catches up).
"""

import os
import time

from flwr.clientapp import ClientApp
from flwr.common import ConfigRecord

from fedshield.engines.flower import client_app as real
from fedshield.engines.flower.records import (FIELDS, STYPE_UPDATE, UPDATE, get_payload,
                                      message_fields, put_payload)

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


@app.query("join")
def join(msg, context):
    return real.join(msg, context)


@app.query("keys")
def keys(msg, context):
    return real.keys(msg, context)


@app.query("catchup")
def catchup(msg, context):
    return real.catchup(msg, context)


@app.train()
def train(msg, context):
    round_idx = int(message_fields(msg)["round"])
    fault = _fault(context, round_idx)
    if fault == "raise":
        raise RuntimeError("injected crash")
    if fault == "exit":
        os._exit(3)
    if fault == "sleep":
        time.sleep(float(context.node_config.get("sleep", 120)))
    reply = real.train(msg, context)
    blob = get_payload(reply.content, UPDATE, STYPE_UPDATE)
    fields = reply.content[FIELDS]
    signature = fields["signature"]
    if fault == "garbage":
        put_payload(reply.content, UPDATE, os.urandom(len(blob)), STYPE_UPDATE)
    elif fault == "replay" and LAST in context.state.array_records:
        # the previous round's update with its own signed record, as a replaying relay would
        put_payload(reply.content, UPDATE, get_payload(context.state, LAST, STYPE_UPDATE),
                    STYPE_UPDATE)
        fields["signature"] = context.state[LAST_SIGNATURE]["signature"]
    put_payload(context.state, LAST, blob, STYPE_UPDATE)
    context.state[LAST_SIGNATURE] = ConfigRecord({"signature": signature})
    return reply


@app.query("share")
def share(msg, context):
    return real.share(msg, context)


@app.evaluate()
def evaluate(msg, context):
    if _fault(context, int(message_fields(msg)["round"])) == "miss-eval":
        raise RuntimeError("injected crash before applying the aggregate")
    return real.apply_and_evaluate(msg, context)
