"""The fedshield ServerApp: enrols the parties, runs the rounds, writes metrics.json and plots.

Run config: ``fedshield-config`` (RunConfig as JSON), ``server-context`` (path of the PUBLIC
context file on the SuperLink's machine) and ``out-dir`` (where metrics.json and plots/ go).
It holds no secret key and never imports openfhe; it never sees a plaintext update, the
global adapter or a client's weight.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path

from flwr.common import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp

from ..atomic import write_json_atomic
from ..config import RunConfig
from ..errors import KeyMaterialError
from ..he.context import load_context
from .records import route_logs_to_flower
from .records import CHUNK_BYTES
from .strategy import EncryptedFedAvg

log = logging.getLogger("fedshield")

route_logs_to_flower()
app = ServerApp()


def _for_plots(metrics: dict) -> dict:
    """metrics with excluded clients and failed rounds as NaN (plots index per party)."""
    n = metrics["config"]["clients"]
    rounds = []
    for r in metrics["rounds"]:
        losses, up = [math.nan] * n, [0] * n
        for party, loss, nbytes in zip(r.get("clients", []), r.get("train_loss", []),
                                       r.get("bytes_up", [])):
            losses[party], up[party] = loss, nbytes
        rounds.append({**r, "train_loss": losses, "bytes_up": up,
                       "bytes_down": r.get("bytes_down", 0),
                       "eval_loss": math.nan if r.get("eval_loss") is None else r["eval_loss"],
                       "seconds": r.get("seconds") or dict.fromkeys(
                           ("train", "prune", "encrypt", "aggregate", "decrypt"), 0.0)})
    initial = metrics["initial_eval_loss"]
    return {**metrics, "rounds": rounds,
            "initial_eval_loss": math.nan if initial is None else initial}


@app.main()
def main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    cfg = RunConfig(**json.loads(str(rc["fedshield-config"])))
    out = Path(str(rc["out-dir"]))
    out.mkdir(parents=True, exist_ok=True)
    server_ctx = load_context(str(rc["server-context"]))
    if server_ctx.has_secret_key or server_ctx.is_party:
        raise KeyMaterialError("the server context must be public (saved without its secret key)")
    metrics = {"config": cfg.to_dict(), "engine": "flower", "server_has_secret_key":
               bool(server_ctx.has_secret_key), "rounds": []}

    def on_round(entry: dict) -> None:
        metrics["rounds"] = strategy.rounds
        metrics["events"] = strategy.events
        write_json_atomic(out / "metrics.json", metrics)
        log.info("round %d %s: eval loss %s, parties %s, excluded %s", entry["round"],
                 entry["status"], entry.get("eval_loss"), entry.get("clients"),
                 [(e["party"], e["reason"]) for e in entry.get("excluded", [])])

    strategy = EncryptedFedAvg(cfg, server_ctx, on_round=on_round,
                               chunk_bytes=int(rc.get("chunk-bytes", CHUNK_BYTES)))
    participants = strategy.enroll(grid, timeout=cfg.round_timeout)
    metrics.update({
        "initial_eval_loss": strategy.initial_eval_loss,
        "participants": sorted(participants.values()),
        "num_lora_values": strategy.num_lora_values,
        "min_clients": strategy.min_clients,
        "events": strategy.events,
    })
    write_json_atomic(out / "metrics.json", metrics)
    if len(participants) < strategy.min_clients:
        metrics["finished"] = False
        metrics["failure"] = (f"{len(participants)} parties enrolled, "
                              f"{strategy.min_clients} needed")
        write_json_atomic(out / "metrics.json", metrics)
        raise RuntimeError(metrics["failure"])
    strategy.start(grid, ArrayRecord(), num_rounds=cfg.rounds, timeout=cfg.round_timeout)
    metrics["rounds"] = strategy.rounds
    metrics["not_enrolled"] = strategy.late_nodes(grid)
    # what the whole server process loaded, not only our modules
    metrics["server_loaded_openfhe"] = "openfhe" in sys.modules
    metrics["finished"] = True
    write_json_atomic(out / "metrics.json", metrics)
    from ..plots import plot_run  # noqa: PLC0415 - matplotlib only when writing plots

    plot_run(_for_plots(metrics), out / "plots")
