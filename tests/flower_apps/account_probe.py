"""What the SuperNode's account can take from a site (tests/test_flower_site.py runs this under
that account): it reads the site's files, and asks the worker over the relay, with the token
copy it was given, for what is not the protocol's. Prints one JSON line."""

import json
import sys
from pathlib import Path

from fedshield.engines.flower.site_ipc import Relay, SiteWorkerError, read_token

node, sock, token = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
read = {}
for name in ("party.key", "identity.key", "data.jsonl", "site.toml", "worker.log",
             "relay.token"):
    try:
        read[name] = len((node / name).read_bytes())
    except OSError as exc:
        read[name] = type(exc).__name__
relay = Relay(sock, read_token(token))


def ask(op, fields):
    try:
        out, sections = relay.request(op, fields, timeout=60)
        return [out, [len(s) for s in sections]]
    except SiteWorkerError as exc:
        return str(exc)


outside = {op: ask(op, fields) for op, fields in [
    ("read-file", {"path": str(node / "party.key")}), ("shutdown", {}),
    ("set-config", {"metrics": "all"}), ("train", {"round": 1, "train_fn": "os:system"})]}
settings = ask("join", {"run-config": json.dumps({"fedshield-config": "{}",
                                                  "train-fn": "os:system"})})
print(json.dumps({"read": read, "ping": ask("ping", {}), "outside": outside,
                  "settings": settings}))
