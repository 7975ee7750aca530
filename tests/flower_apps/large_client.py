"""A ClientApp that sends one large synthetic encrypted update per round (no training), to
push big payloads through real Flower processes; it checks the decrypted average itself and
writes the result to out-dir/large-check-<party>.json for the test to read."""

import json
import time
from pathlib import Path

import numpy as np
import torch
from flwr.clientapp import ClientApp
from flwr.common import ConfigRecord, Message, MetricRecord, RecordDict

import fedshield as fs
from fedshield.flower.records import STYPE_AGGREGATE, STYPE_UPDATE, get_payload, put_payload
from fedshield.flower.strategy import AGGREGATE, UPDATE

app = ClientApp()


def _setup(context):
    party = int(context.node_config["party-id"])
    ctx = fs.load_context(str(context.node_config["key-file"]))
    n = int(context.node_config["large-values"])
    return party, ctx, n


def _state(party, round_idx, n):
    rng = np.random.default_rng(1000 * round_idx + party)
    return {"big": torch.from_numpy(rng.uniform(-1, 1, size=n).astype(np.float32))}


@app.query("join")
def join(msg, context):
    party, ctx, _ = _setup(context)
    return Message(RecordDict({
        "config": ConfigRecord({"context-fp": ctx.fingerprint.hex()}),
        "metrics": MetricRecord({"party": party, "version": 0, "eval-loss": 0.0})}),
        reply_to=msg)


@app.train()
def train(msg, context):
    party, ctx, n = _setup(context)
    round_idx = int(msg.content.config_records["config"]["round"])
    state = _state(party, round_idx, n)
    start = time.perf_counter()
    upd = fs.encrypt_update(ctx, state, fs.Layout.from_state_dict(state), weight=party + 1.0,
                            round=round_idx, weight_bound=4.0)
    seconds = time.perf_counter() - start
    content = RecordDict({"metrics": MetricRecord({
        "party": party, "train-loss": 0.0, "kept": 1.0, "seconds-train": 0.0,
        "seconds-prune": 0.0, "seconds-encrypt": seconds, "lr": 0.0, "prune-ratio": 0.0})})
    put_payload(content, UPDATE, upd.to_bytes(), STYPE_UPDATE)
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg, context):
    party, ctx, n = _setup(context)
    config = msg.content.config_records["config"]
    round_idx = int(config["round"])
    blob = get_payload(msg.content, AGGREGATE, STYPE_AGGREGATE)
    agg = fs.EncryptedUpdate.from_bytes(blob)
    parties = [int(p) for p in config["present"]]
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
    return Message(RecordDict({"metrics": MetricRecord({
        "party": party, "version": round_idx, "eval-loss": err, "seconds-decrypt": 0.0})}),
        reply_to=msg)
