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
from fedshield.fl.messages import EvalReply, SiteInfo, TrainReply
from fedshield.fl.protocol import TrainRequest, TrainResult
from fedshield.engines.flower import client_app as real
from fedshield.trust.identity import Identity
from fedshield.engines.flower.records import FIELDS, get_blobs, message_fields, put_blobs

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


def _reply(msg, fields, blobs=()):
    content = RecordDict()
    count = put_blobs(content, blobs)
    content[FIELDS] = ConfigRecord({**fields, "blobs": count})
    return Message(content, reply_to=msg)


def join(msg, context):
    """The site worker's enrolment (its identity), with this app's weight and size."""
    reply = real.relay(msg, context)
    fields = message_fields(reply)
    info = SiteInfo.from_fields(fields)
    info = SiteInfo(party=info.party, name=f"large-{info.party}", data="none",
                    train_examples=TRAIN_EXAMPLES, eval_examples=1, eval_loss=0.0,
                    context_fp=info.context_fp, identity=info.identity,
                    num_lora_values=int(context.node_config["large-values"]))
    return _reply(msg, {**fields, **info.to_fields()})


def check(context, party, ctx, n, blob):
    """Decrypts the aggregate and compares it with the average of every party's state."""
    agg = fs.EncryptedUpdate.from_bytes(blob)
    round_idx = agg.round
    parties = list(range(agg.n_summed))      # in this test every party contributes
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
    return EvalReply(party=party, version=round_idx, eval_loss=err, eval_examples=1)


def train(msg, context):
    """Checks the aggregate the request carries; makes this round's large update. A request
    that carries the key set-up's commit goes to the site worker first, which commits (and
    trains its own model: its update is not sent)."""
    fields = message_fields(msg)
    request = TrainRequest.from_wire({k: v for k, v in fields.items() if k not in
                                      ("op", "blobs")}, get_blobs(msg.content, fields["blobs"]))
    committed = None
    if request.commit is not None:
        committed = message_fields(real.relay(msg, context)).get("committed")
    party, ctx, n = _setup(context)
    evaluation = (check(context, party, ctx, n, request.apply.blob)
                  if request.apply is not None else None)
    update = None
    if request.plan is not None:
        plan = request.plan
        state = _state(party, plan.round, n)
        start = time.perf_counter()
        upd = fs.encrypt_update(ctx, state, fs.Layout.from_state_dict(state),
                                weight=party + 1.0, round=plan.round,
                                weight_bound=plan.weight_bound)
        blob = upd.to_bytes()
        identity = Identity.load(str(context.node_config["identity-file"]))
        update = TrainReply(party=party, round=plan.round, train_loss=0.0, kept_fraction=1.0,
                            seconds={"encrypt": time.perf_counter() - start}, update=blob,
                            signature=sign_update(identity, party, blob))
    out, blobs = TrainResult(evaluation=evaluation, update=update,
                             committed=committed).to_wire()
    return _reply(msg, out, blobs)


@app.train()
def train_step(msg, context):
    return train(msg, context)


@app.query("join")
def join_step(msg, context):
    return join(msg, context)


@app.query("keys")
def keys(msg, context):
    return real.relay(msg, context)
