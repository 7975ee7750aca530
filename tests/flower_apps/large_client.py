"""A ClientApp that sends one large synthetic encrypted update per round (no training), to
push big payloads through real Flower processes; it checks the decrypted average itself and
writes the result to out-dir/large-check-<party>.json for the test to read.

Enrolment and the key set-up go to the node's real site worker (its identity and key file,
made on the node); the large update is signed with that identity like a real one. This app
reads the site's key and identity files itself (the test names them in its node config): it
runs under the site's own account, which a real site's SuperNode does not."""

import json
import time
from pathlib import Path

import numpy as np
import torch
from flwr.clientapp import ClientApp
from flwr.common import ConfigRecord, Message, RecordDict

import fedshield as fs
from fedshield.trust.guard import sign_update
from fedshield.fl.messages import EvalReply, RoundPlan, SiteInfo, TrainReply
from fedshield.engines.flower import client_app as real
from fedshield.trust.identity import Identity
from fedshield.engines.flower.records import (AGGREGATE, FIELDS, STYPE_AGGREGATE, STYPE_UPDATE, UPDATE,
                                      get_payload, message_fields, put_payload)

app = ClientApp()
TRAIN_EXAMPLES = 3   # the server's weight bound is then 4; the weights are 1 and 2


def _setup(context):
    """The party, its key (committed by the key set-up) and the update's size."""
    party = int(context.node_config["party-id"])
    ctx = fs.load_context(str(context.node_config["key-file"]))
    n = int(context.node_config["large-values"])
    return party, ctx, n


def _state(party, round_idx, n):
    rng = np.random.default_rng(1000 * round_idx + party)
    return {"big": torch.from_numpy(rng.uniform(-1, 1, size=n).astype(np.float32))}


def _reply(msg, fields, content=None):
    content = content or RecordDict()
    content[FIELDS] = ConfigRecord(fields)
    return Message(content, reply_to=msg)


@app.query("join")
def join(msg, context):
    """The site worker's enrolment (its identity), with this app's weight and size."""
    reply = real.join(msg, context)
    fields = message_fields(reply)
    info = SiteInfo.from_fields(fields)
    info = SiteInfo(party=info.party, name=f"large-{info.party}", data="none",
                    train_examples=TRAIN_EXAMPLES, eval_examples=1, eval_loss=0.0,
                    context_fp=info.context_fp, identity=info.identity,
                    num_lora_values=int(context.node_config["large-values"]))
    return _reply(msg, {**fields, **info.to_fields()})


@app.query("keys")
def keys(msg, context):
    return real.keys(msg, context)


@app.train()
def train(msg, context):
    party, ctx, n = _setup(context)
    plan = RoundPlan.from_fields(message_fields(msg))
    state = _state(party, plan.round, n)
    start = time.perf_counter()
    upd = fs.encrypt_update(ctx, state, fs.Layout.from_state_dict(state), weight=party + 1.0,
                            round=plan.round, weight_bound=plan.weight_bound)
    reply = TrainReply(party=party, round=plan.round, train_loss=0.0, kept_fraction=1.0,
                       seconds={"encrypt": time.perf_counter() - start})
    blob = upd.to_bytes()
    identity = Identity.load(str(context.node_config["identity-file"]))
    content = RecordDict()
    put_payload(content, UPDATE, blob, STYPE_UPDATE)
    return _reply(msg, {**reply.to_fields(), "signature": sign_update(identity, party, blob)},
                  content)


@app.evaluate()
def evaluate(msg, context):
    party, ctx, n = _setup(context)
    fields = message_fields(msg)
    round_idx = int(fields["round"])
    blob = get_payload(msg.content, AGGREGATE, STYPE_AGGREGATE)
    agg = fs.EncryptedUpdate.from_bytes(blob)
    parties = [int(p) for p in fields["clients"]]
    states = [_state(p, round_idx, n)["big"].double() for p in parties]
    weights = [p + 1.0 for p in parties]
    expected = sum(w * s for w, s in zip(weights, states)) / sum(weights)
    layout = fs.Layout.from_state_dict({"big": states[0]})
    got = fs.decrypt_update(ctx, agg, layout)["big"].double()
    err = float((got - expected).abs().max())
    out = Path(str(context.node_config["out-dir"]))
    (out / f"large-check-{party}.json").write_text(json.dumps({
        "round": round_idx, "max_abs_err": err, "aggregate_bytes": len(blob),
        "n_summed": agg.n_summed, "parties": parties}))
    reply = EvalReply(party=party, version=round_idx, eval_loss=err, eval_examples=1)
    return _reply(msg, reply.to_fields())
