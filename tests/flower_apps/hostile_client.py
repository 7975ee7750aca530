"""A ClientApp that a malicious server ships in its FAB (tests/test_flower_site.py): on every
message it first tries to take what belongs to the site, then relays as fedshield's own
ClientApp does, so the run goes on and shows that the attempts changed nothing.

It writes what each attempt got to ``probe-out`` (node config) as JSON lines. The attempts:
read the site's key, identity and data files (``probe-dir``: where the launcher keeps the
site's files, which an attacker can guess), ask the worker for operations outside the
protocol, send protocol operations with extra fields that would change the site's settings,
and join with a run config that names the site's train_fn and metrics policy.
"""

import json
from pathlib import Path

from flwr.clientapp import ClientApp

from fedshield.engines.flower import client_app as real
from fedshield.engines.flower.records import message_fields
from fedshield.engines.flower.site_ipc import Relay, SiteWorkerError

app = ClientApp()

OUTSIDE = ["shutdown", "read-file", "get-config", "set-config", "export-key", "keys",
           "keys.export-secret", "ping2", "", "join.config"]
SETTINGS = {"train_fn": "functools:partial", "train-fn": "os:system", "metrics": "all",
            "out-dir": "/tmp/stolen", "key-file": "/tmp/stolen.key", "data": "/etc/passwd",
            "socket": "/tmp/other.sock"}


def _log(context, record):
    with open(str(context.node_config["probe-out"]), "a") as fh:
        fh.write(json.dumps(record) + "\n")


def _probe(context, stage):
    node_dir = Path(str(context.node_config["probe-dir"]))
    for name in ("party.key", "identity.key", "data.jsonl", "site.toml", "worker.log"):
        try:
            got = len((node_dir / name).read_bytes())
        except OSError as exc:
            got = type(exc).__name__
        _log(context, {"stage": stage, "attempt": f"read {name}", "got": got})
    relay = Relay.from_node_config(real.node_config(context))
    asks = [(op, {}) for op in OUTSIDE]
    asks += [("join", {"run-config": json.dumps({"fedshield-config": "{}", **SETTINGS})}),
             ("train", {"round": 1, **{k: v for k, v in SETTINGS.items()}}),
             ("evaluate", {"save-adapter": True, "out-dir": "/tmp/stolen"}),
             ("catchup.send", {"version": 0, "to": [0], "reply-to": "/tmp/x"}),
             ("ping", {"dump": True})]
    for op, fields in asks:
        try:
            out, sections = relay.request(op, fields, timeout=60)
            got = {"fields": out, "sections": [len(s) for s in sections]}
        except SiteWorkerError as exc:
            got = str(exc)
        _log(context, {"stage": stage, "attempt": f"op {op!r} {sorted(fields)}", "got": got})


def relay(msg, context):
    kind = msg.metadata.message_type
    if kind == "query.join":
        _probe(context, "join")
    elif kind == "train" and message_fields(msg).get("round") == 1:
        _probe(context, "train")   # after the key set-up (its commit rides on this request)
    return real.relay(msg, context)


for _register in (app.train(), app.query("join"), app.query("share"), app.query("catchup"),
                  app.query("keys")):
    _register(relay)
