"""The fedshield ClientApp: one party of the federation on one SuperNode.

Node config (``flower-supernode --node-config``): ``party-id`` (0..clients-1: which data shard
and, in threshold mode, which key share), ``key-file`` (this party's context, mode 0600) and
optionally ``out-dir`` (where the adapter goes when the server asks this node to write it).
Run config: ``fedshield-config`` (the RunConfig as JSON; every party builds the same model and
data split from its seed, so a client's half of a round is the local engine's, unchanged).

The party's copy of the global LoRA adapter lives in ``context.state`` between messages (Flower
keeps it on the node), with ``version``: the last round whose aggregate it applied.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from flwr.clientapp import ClientApp
from flwr.common import (Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord,
                         RecordDict)

from ..config import RunConfig
from ..crypto_ops import decrypt_update
from ..errors import FedShieldError, KeyMaterialError
from ..he import combine_partials, load_context, partial_decrypt
from ..runner import LocalSimulation, _Timer
from ..update import EncryptedUpdate
from .records import route_logs_to_flower
from .records import STYPE_AGGREGATE, STYPE_SHARE, STYPE_UPDATE, get_payload, put_payload
from .strategy import AGGREGATE, SHARE, UPDATE, share_key

log = logging.getLogger("fedshield")

STATE_GLOBAL = "fedshield.global"
STATE_NODE = "fedshield.node"

route_logs_to_flower()
app = ClientApp()


class OutOfStep(FedShieldError):
    """This party's global adapter is not the one the server's round builds on."""


class _Party:
    """What one party holds: its simulation half, its key, its party id."""

    def __init__(self, context: Context) -> None:
        node = context.node_config
        try:
            self.party = int(node["party-id"])
            key_file = str(node["key-file"])
        except KeyError as exc:
            raise FedShieldError(f"node config lacks {exc}: start the SuperNode with "
                                 "--node-config 'party-id=I key-file=\"PATH\"'") from exc
        cfg = RunConfig(**json.loads(str(context.run_config["fedshield-config"])))
        out = str(node.get("out-dir", "")) or str(Path(cfg.out) / f"party-{self.party}")
        self.cfg = cfg.replace(out=out)
        if not 0 <= self.party < cfg.clients:
            raise FedShieldError(f"party-id {self.party} is not in [0, {cfg.clients})")
        self.ctx = load_context(key_file)
        if cfg.keys == "threshold":
            if not self.ctx.is_party or self.ctx.party_id != self.party:
                raise KeyMaterialError(f"{key_file} is not the key share of party {self.party}")
        elif not self.ctx.has_secret_key:
            raise KeyMaterialError(f"{key_file} holds no secret key (shared-key mode)")
        self.sim = LocalSimulation(self.cfg, show_progress=False, make_keys=False)

    # -- the global adapter in context.state ---------------------------------------------
    def restore(self, context: Context) -> int:
        state = context.state
        if STATE_NODE not in state.config_records:
            return 0
        record = state.array_records[STATE_GLOBAL]
        self.sim.global_state = {name: torch.from_numpy(record[name].numpy().copy())
                                 for name in self.sim.layout.names}
        return int(state.config_records[STATE_NODE]["version"])

    def store(self, context: Context, version: int) -> None:
        context.state[STATE_GLOBAL] = ArrayRecord(
            {k: Array(np.ascontiguousarray(v.detach().cpu().numpy()))
             for k, v in self.sim.global_state.items()})
        context.state[STATE_NODE] = ConfigRecord({"version": version, "party": self.party})


_PARTIES: dict[tuple[int, int], _Party] = {}


def _party(context: Context) -> tuple[_Party, int]:
    """This node's party (built once per process) and the version of its global adapter."""
    key = (context.run_id, context.node_id)
    if key not in _PARTIES:
        _PARTIES.clear()
        _PARTIES[key] = _Party(context)
    party = _PARTIES[key]
    return party, party.restore(context)


def _reply(msg: Message, content: RecordDict) -> Message:
    return Message(content=content, reply_to=msg)


@app.query("join")
def join(msg: Message, context: Context) -> Message:
    """Party id, context fingerprint and the held-out loss of the initial adapter."""
    party, version = _party(context)
    if version == 0:
        party.store(context, 0)
    return _reply(msg, RecordDict({
        "config": ConfigRecord({"context-fp": party.ctx.fingerprint.hex()}),
        "metrics": MetricRecord({"party": party.party, "version": version,
                                 "num-lora-values": party.sim.layout.numel,
                                 "eval-loss": party.sim.evaluate()})}))


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Trains from the global adapter, prunes, encrypts: the local engine's client half."""
    party, version = _party(context)
    config = msg.content.config_records["config"]
    round_idx, expected = int(config["round"]), int(config["global-version"])
    if version != expected:
        raise OutOfStep(f"party {party.party} holds the adapter of round {version}, the server "
                        f"builds round {round_idx} on round {expected}")
    timer = _Timer()
    plan = party.sim.plan_round(round_idx, timer)
    reply = party.sim.client_round(party.party, plan, timer, ctx=party.ctx)
    content = RecordDict({"metrics": MetricRecord({
        "party": party.party, "train-loss": reply.loss, "kept": reply.kept,
        "seconds-train": timer.seconds["train"], "seconds-prune": timer.seconds["prune"],
        "seconds-encrypt": timer.seconds["encrypt"], "lr": plan.lr,
        "prune-ratio": plan.ratio})})
    put_payload(content, UPDATE, reply.payload, STYPE_UPDATE)
    return _reply(msg, content)


@app.query("share")
def share(msg: Message, context: Context) -> Message:
    """Threshold mode: this party's partial decryption of the round's aggregate."""
    party, _ = _party(context)
    config = msg.content.config_records["config"]
    start = time.perf_counter()
    agg = EncryptedUpdate.from_bytes(get_payload(msg.content, AGGREGATE, STYPE_AGGREGATE))
    if agg.round != int(config["round"]):
        raise OutOfStep(f"asked to decrypt round {agg.round}'s aggregate in round "
                        f"{int(config['round'])}")
    blob = partial_decrypt(party.ctx, agg, present=[int(p) for p in config["present"]])
    content = RecordDict({"metrics": MetricRecord({"seconds": time.perf_counter() - start})})
    put_payload(content, SHARE, blob, STYPE_SHARE)
    return _reply(msg, content)


@app.evaluate()
def apply_and_evaluate(msg: Message, context: Context) -> Message:
    """Decrypts the aggregate (threshold: fuses the shares), applies it, reports the loss."""
    party, version = _party(context)
    config = msg.content.config_records["config"]
    round_idx, base = int(config["round"]), int(config["base-version"])
    if version != base:
        raise OutOfStep(f"party {party.party} holds the adapter of round {version}, the "
                        f"aggregate of round {round_idx} applies to round {base}")
    start = time.perf_counter()
    agg = EncryptedUpdate.from_bytes(get_payload(msg.content, AGGREGATE, STYPE_AGGREGATE))
    if agg.round != round_idx or not agg.is_aggregate:
        raise OutOfStep(f"expected the aggregate of round {round_idx}, got {agg!r}")
    plan = party.sim.plan_round(round_idx)  # the same mask the clients encrypted under
    if party.cfg.keys == "threshold":
        shares = [get_payload(msg.content, share_key(int(p)), STYPE_SHARE)
                  for p in config["present"]]
        average = combine_partials(agg, shares, party.sim.layout, mask=plan.mask)
    else:
        average = decrypt_update(party.ctx, agg, party.sim.layout, mask=plan.mask)
    seconds = time.perf_counter() - start
    party.sim.apply_average(average)
    party.store(context, round_idx)
    loss = party.sim.evaluate()
    if bool(config["save-adapter"]):
        party.sim.out.mkdir(parents=True, exist_ok=True)
        party.sim._save_adapter()  # noqa: SLF001 - the local engine's own writer
        log.info("party %d wrote %s/adapter", party.party, party.sim.out)
    return _reply(msg, RecordDict({"metrics": MetricRecord({
        "party": party.party, "version": round_idx, "eval-loss": loss,
        "seconds-decrypt": seconds})}))
