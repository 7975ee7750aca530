"""A toy Flower app mirroring fedshield's message pattern (custom-stype chunks, query/train/evaluate)."""
import hashlib, json, os
from pathlib import Path
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp
from flwr.common import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

client = ClientApp()
server = ServerApp()

@client.query("join")
def join(msg, context):
    return Message(RecordDict({"metrics": MetricRecord({"party": int(context.node_config["party-id"])})}), reply_to=msg)

@client.train()
def train(msg, context):
    n = int(msg.content.config_records["config"]["nbytes"])
    data = os.urandom(n)
    chunk = 64 << 20
    arrays = {f"{i:06d}": Array(dtype="uint8", shape=(len(data[s:s+chunk]),), stype="fedshield.update.v1", data=data[s:s+chunk]) for i, s in enumerate(range(0, n, chunk))}
    return Message(RecordDict({"u": ArrayRecord(arrays), "m": ConfigRecord({"sha": hashlib.sha256(data).hexdigest()})}), reply_to=msg)

@server.main()
def main(grid, context):
    import time
    out = Path(str(context.run_config["out"]))
    while len(list(grid.get_node_ids())) < 2: time.sleep(0.5)
    nodes = sorted(grid.get_node_ids())
    reps = grid.send_and_receive([Message(RecordDict(), dst_node_id=n, message_type="query.join") for n in nodes], timeout=120)
    parties = sorted(int(r.content.metric_records["metrics"]["party"]) for r in reps)
    nbytes = int(context.run_config["nbytes"])
    reps = grid.send_and_receive([Message(RecordDict({"config": ConfigRecord({"nbytes": nbytes})}), dst_node_id=n, message_type="train") for n in nodes], timeout=300)
    ok = []
    for r in reps:
        rec = r.content.array_records["u"]
        data = b"".join(rec[k].data for k in sorted(rec.keys()))
        ok.append(hashlib.sha256(data).hexdigest() == r.content.config_records["m"]["sha"] and len(data) == nbytes)
        try:
            rec[sorted(rec.keys())[0]].numpy(); ok.append(False)
        except TypeError:
            pass
    (out / "toy-result.json").write_text(json.dumps({"parties": parties, "ok": ok, "finished": True}))
