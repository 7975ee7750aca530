"""The keyless server needs neither torch nor openfhe: in a process where torch, transformers,
peft, triton and openfhe cannot be imported, the aggregation path and the Flower server side
work (the `server` install: `pip install "fedshield[server]"`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import venv
from pathlib import Path

import pytest

import fedshield as fs

from conftest import make_state, weighted_average

BLOCKED = ("torch", "transformers", "peft", "triton", "openfhe")

CHILD = textwrap.dedent("""
    import importlib.abc, json, sys

    BLOCKED = %r

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{name} is blocked in this process")
            return None

    sys.meta_path.insert(0, Block())
    work = sys.argv[1]
    import fedshield as fs
    ctx = fs.load_context(open(f"{work}/server.ctx", "rb").read())
    assert not ctx.has_secret_key
    updates = [fs.EncryptedUpdate.from_bytes(open(f"{work}/u{i}.bin", "rb").read())
               for i in range(3)]
    agg = fs.aggregate(ctx, updates, round=4, weight_bound=8.0)
    open(f"{work}/agg.bin", "wb").write(agg.to_bytes())
    # the whole Flower server side and the Server of the FL layer
    from fedshield.config import RunConfig
    from fedshield.fl.messages import SiteInfo, TrainReply
    from fedshield.trust.guard import sign_update
    from fedshield.fl.server import Server
    from fedshield.engines.flower import records, server_app, transport  # noqa: F401
    from fedshield.trust.identity import Identity
    ids = {p: Identity.generate() for p in range(3)}  # the sites' (signing needs no openfhe)
    identity_hex = lambda p: ids[p].public.to_bytes().hex()
    server = Server(RunConfig.from_flat(clients=3), ctx, engine="local")
    server.enrol([(p, SiteInfo(party=p, name=str(p), data="-", train_examples=8,
                               eval_examples=1, eval_loss=1.0,
                               context_fp=ctx.fingerprint.hex(),
                               identity=identity_hex(p))) for p in range(3)])
    for r in (1, 2, 3):  # the test's updates are of round 4
        server.plan(r)
        server.fail("skipped")
    plan = server.plan(4)
    replies = [(p, TrainReply(party=p, round=4, train_loss=1.0, kept_fraction=1.0,
                              update=u.to_bytes(), signature=sign_update(ids[p], p, u.to_bytes())))
               for p, u in enumerate(updates)]
    accepted = server.screen_updates(plan, replies)
    agg2 = server.aggregate(plan, accepted)
    assert agg2.n_summed == 3 and server.current.clients == [0, 1, 2]
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    json.dump({"loaded": loaded, "n_summed": agg.n_summed}, open(f"{work}/result.json", "w"))
    print("CHILD-OK")
""") % (BLOCKED,)


def test_the_server_path_runs_with_torch_and_openfhe_blocked(tmp_path, client_ctx, server_ctx):
    states = [make_state(60 + i) for i in range(3)]
    layout = fs.Layout.from_state_dict(states[0])
    weights = [1.0, 3.0, 8.0]
    for i, (state, w) in enumerate(zip(states, weights)):
        upd = fs.encrypt_update(client_ctx, state, layout, weight=w, round=4, weight_bound=8.0)
        (tmp_path / f"u{i}.bin").write_bytes(upd.to_bytes())
    (tmp_path / "server.ctx").write_bytes(server_ctx.to_bytes())
    proc = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and "CHILD-OK" in proc.stdout, proc.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result == {"loaded": [], "n_summed": 3}
    # what the blocked process aggregated decrypts to the weighted average
    agg = fs.EncryptedUpdate.from_bytes((tmp_path / "agg.bin").read_bytes())
    out = fs.decrypt_update(client_ctx, agg, layout)
    ref = weighted_average(states, weights)
    for name in ref:
        assert abs(out[name].double().numpy() - ref[name]).max() <= 1e-6


def test_the_blocker_really_blocks(tmp_path):
    """Control: the same child process cannot import torch."""
    code = CHILD.split("work = sys.argv[1]")[0] + "import torch\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0 and "torch is blocked" in proc.stderr


@pytest.mark.slow
def test_server_only_install_pulls_no_torch(tmp_path):
    """`pip install ".[server]"` into a fresh venv: no torch, transformers, peft or openfhe,
    and the aggregation path works there. Prints the venv's size (docs/ARCHITECTURE.md, "Server-only
    install")."""
    root = Path(__file__).resolve().parents[1]
    env_dir = tmp_path / "server-venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    subprocess.run([py, "-m", "pip", "install", "-q", f"{root}[server]"], check=True,
                   timeout=1800, env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    listed = subprocess.run([py, "-m", "pip", "list", "--format=json"], check=True,
                            capture_output=True, text=True).stdout
    names = {p["name"].lower() for p in json.loads(listed)}
    assert not names & set(BLOCKED), names & set(BLOCKED)
    assert {"fedshield", "numpy", "flwr"} <= names
    check = ("import fedshield as fs, sys; "
             "assert not {'torch', 'openfhe'} & set(sys.modules); print('ok')")
    assert subprocess.run([py, "-c", check], capture_output=True, text=True,
                          check=True).stdout.strip() == "ok"
    size = sum(f.stat().st_size for f in env_dir.rglob("*") if f.is_file())
    print(f"server-only venv: {size / 2**20:.0f} MiB, {len(names)} packages")
