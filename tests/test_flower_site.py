"""A site's own worker (issue 19, item 3 and 4): its site config, the authenticated relay that a
SuperNode's ClientApp (code from the server's FAB) must go through, the protocol-only requests
it answers, the metrics that leave it, the errors that leave it, and its files at rest.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

import fedshield as fs
from fedshield.config import RunConfig
from fedshield.fl.messages import EvalReply, SiteInfo, TrainReply
from fedshield.fl.site_config import SiteConfig, site_settings_in
from fedshield.fl.train_fn import TrainFnError
from fedshield.engines.flower import site_worker as sw
from fedshield.engines.flower.site_ipc import (MAGIC, Relay, RelayAuthError, WorkerRefused, make_token,
                                       read_token, send_frame)

APPS = Path(__file__).parent / "flower_apps"
REFUSED = "RequestRefused: the site worker does not answer this request"


def site_config(tmp_path: Path, **settings) -> SiteConfig:
    from fedshield.data.sites import write_site_files
    from fedshield.data.synthetic import make_synthetic_examples

    node = tmp_path / "node"
    node.mkdir(mode=0o700, exist_ok=True)
    (written,) = write_site_files([make_synthetic_examples(16, 0)], tmp_path / "given")
    written.rename(node / "data.jsonl")
    return SiteConfig.from_dict({"node_dir": str(node), "party_id": 0, "data": "data.jsonl",
                                 **settings})


@contextmanager
def worker_thread(site_cfg: SiteConfig):
    """The site's worker serving in this process (a thread), as `fedshield site worker` does."""
    token = read_token(make_token(site_cfg.path("token_file")))
    worker = sw.SiteWorker(site_cfg)
    server = sw.listen(site_cfg.path("socket"))
    thread = threading.Thread(target=worker.serve, args=(server, token), daemon=True)
    thread.start()
    try:
        yield worker, Relay(site_cfg.path("socket"), token)
    finally:
        worker.stopping = True
        thread.join(10)
        server.close()


# -- the site config ---------------------------------------------------------------------------

def test_site_config_validates_and_round_trips(tmp_path):
    cfg = SiteConfig.from_dict({"node_dir": "n", "party_id": 2, "data": "d.jsonl",
                                "train_fn": "pkg.mod:fn"}, base=tmp_path)
    assert cfg.node_dir == str(tmp_path / "n") and cfg.metrics == "aggregate"
    assert cfg.path("key_file") == tmp_path / "n" / "party.key"
    assert cfg.path("socket") == tmp_path / "n" / "worker.sock"
    assert cfg.site_name == "d"
    (tmp_path / "n").mkdir()
    path = cfg.save(tmp_path / "n" / "site.toml")
    assert path.stat().st_mode & 0o777 == 0o600
    assert SiteConfig.from_file(path) == cfg
    for bad, match in [({"party_id": -1}, "party_id=-1"), ({"party_id": True}, "party_id=True"),
                       ({"metrics": "some"}, "metrics='some'"), ({"data": ""}, "data=''"),
                       ({"train_fn": "nocolon"}, "train_fn='nocolon'"),
                       ({"idle_timeout": -1}, "idle_timeout=-1"), ({"columns": "x"}, "columns"),
                       ({"key_file": 3}, "key_file=3"), ({"federation_file": "f"}, "unknown")]:
        with pytest.raises(fs.ParameterError, match=match):
            SiteConfig.from_dict({"node_dir": "/n", "party_id": 0, "data": "d", **bad})
    (tmp_path / "two.toml").write_text('[site]\nnode_dir = "n"\n[other]\n')
    with pytest.raises(fs.ParameterError, match="one \\[site\\] table"):
        SiteConfig.from_file(tmp_path / "two.toml")


def test_site_worker_command_refuses_a_bad_config(tmp_path, capsys):
    from fedshield.cli.commands import main

    assert main(["site", "worker", "--config", str(tmp_path / "none.toml")]) == 2
    assert "cannot read site config" in capsys.readouterr().err
    (tmp_path / "bad.toml").write_text('[site]\nnode_dir = "n"\nparty_id = 0\ndata = "d"\n'
                                       'metrics = "everything"\n')
    assert main(["site", "worker", "--config", str(tmp_path / "bad.toml")]) == 2
    assert "metrics='everything'" in capsys.readouterr().err


def test_a_run_config_that_names_a_site_setting_is_refused():
    """train-fn (what code runs), the metrics policy (what leaves) and every file are the
    site's: a run config naming one, in either spelling, is refused with the names."""
    settings = json.dumps(RunConfig.from_flat(clients=2).to_dict())
    ok = sw.run_config_of(json.dumps({"fedshield-config": settings, "out-dir": "/srv/run"}))
    assert ok.n_sites == 2
    for key in ("train-fn", "train_fn", "metrics", "key-file", "data", "model", "socket"):
        with pytest.raises(sw.RunConfigRefused, match=key):
            sw.run_config_of(json.dumps({"fedshield-config": settings, key: "x"}))
    assert site_settings_in(["out-dir", "server-context", "chunk-bytes"]) == []


# -- the relay and the protocol ----------------------------------------------------------------

def test_the_worker_answers_only_the_protocol_over_an_authenticated_relay(tmp_path):
    """Without the relay token nothing is answered (nor is the token sent); with it, only the
    protocol's operations with their own fields, and a round request before the join is
    refused. Every refusal is the fixed text; the worker serves on, its settings unchanged."""
    site_cfg = site_config(tmp_path)
    with worker_thread(site_cfg) as (worker, relay):
        assert relay.request("ping", {}) == ({}, [])
        with pytest.raises(RelayAuthError):
            Relay(relay.socket, b"\0" * 32).request("ping", {})
        # a peer that skips the handshake and sends a frame gets no reply at all
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:
            raw.settimeout(15)
            raw.connect(str(relay.socket))
            assert raw.recv(len(MAGIC)) == MAGIC
            raw.recv(32)
            send_frame(raw, {"op": "ping", "fields": {}})
            assert raw.recv(1 << 16) == b""     # hung up
        for op, fields in [("shutdown", {}), ("read-file", {"path": "/etc/passwd"}),
                           ("get-config", {}), ("set-config", {"metrics": "all"}),
                           ("keys", {}), ("", {}), ("ping", {"dump": True}),
                           ("train", {"round": 1, "train-fn": "os:system"}),
                           ("train", {"round": "1"}), ("share", {"round": 1}),
                           ("evaluate", {"out-dir": "/tmp/x"}),
                           ("catchup.take", {"version": 1, "from": 0, "x": 1}),
                           ("keys.begin", {"roster": [{"nested": 1}]})]:
            with pytest.raises(WorkerRefused) as info:
                relay.request(op, fields)
            assert str(info.value) == REFUSED, (op, fields, str(info.value))
        with pytest.raises(WorkerRefused, match="^NotJoined: the site has not joined a run$"):
            relay.request("train", {"round": 1})
        with pytest.raises(WorkerRefused, match="^NotJoined"):
            relay.request("keys.begin", {"epoch": 1})
        with pytest.raises(WorkerRefused, match="^RunConfigRefused: the run config names a "
                                                "setting that only the site decides$"):
            relay.request("join", {"run-config": json.dumps({"fedshield-config": "{}",
                                                             "train-fn": "functools:partial"})})
        assert worker.cfg == site_cfg and worker.site is None and worker.train_fn is None
        assert relay.request("ping", {}) == ({}, [])
        # a site without a pinned federation (and no opt-in) does not join, and says why
        run = json.dumps({"fedshield-config": json.dumps(RunConfig.from_flat(
            clients=2, lora_r=2).to_dict())})
        with pytest.raises(WorkerRefused, match="^KeySetupError: the key set-up failed at this "
                                                "site \\(this site has no pinned federation"):
            relay.request("join", {"run-config": run})


def test_a_socket_path_longer_than_sun_path(tmp_path):
    """A site may put its socket under a deep directory: paths beyond AF_UNIX's 107 bytes are
    bound and reached through the directory's /proc/self/fd entry."""
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    site_cfg = site_config(tmp_path, socket=str(deep / "worker.sock"))
    assert len(str(site_cfg.path("socket"))) > 107
    with worker_thread(site_cfg) as (_, relay):
        assert relay.request("ping", {}) == ({}, [])


def test_train_fn_errors_leave_the_site_as_a_type_and_a_fixed_message(tmp_path):
    """A site's train-fn that raises with training rows, its paths and its plan's repr in
    the message: the reply holds only 'TrainFnError: the site's training function failed';
    the details are in the site's own log."""
    sys.path.insert(0, str(APPS))
    try:
        site_cfg = site_config(tmp_path, train_fn="leaky_train:train",
                         insecure_trust_server_roster=True)
        cfg = RunConfig.from_flat(clients=2, rounds=1, local_steps=1, examples_per_client=16,
                                  lora_r=2, samples=0, he=False)
        run = json.dumps({"fedshield-config": json.dumps(cfg.to_dict())})
        with worker_thread(site_cfg) as (worker, relay):
            worker_log = tmp_path / "worker.log"
            sw.log_to(worker_log)
            fields, _ = relay.request("join", {"resume": False, "run-config": run})
            # the default policy (aggregate) keeps the data file's path and nothing is lost
            info = SiteInfo.from_fields(fields)
            assert info.data == "" and info.eval_loss is not None and info.party == 0
            plan = {"round": 1, "lr": 0.01, "prune": "off", "prune-ratio": 0.0,
                    "weight-bound": 16.0, "base-version": 0}
            with pytest.raises(WorkerRefused) as got:
                relay.request("train", plan)
        text = str(got.value)
        assert text == "TrainFnError: the site's training function failed"
        assert "LEAKED-ROW-TOKENS" in worker_log.read_text()   # the site keeps the details
    finally:
        sys.path.remove(str(APPS))
        for handler in list(sw.log.handlers):
            if getattr(handler, "baseFilename", "") == str(tmp_path / "worker.log"):
                sw.log.removeHandler(handler)
                handler.close()
        sw.log.propagate = True


class _Custom(Exception):
    pass


def test_error_reply_carries_no_value_of_the_site():
    secret = "/srv/site/train.jsonl [101, 2023, 7]"
    try:
        try:
            raise RuntimeError(secret)
        except RuntimeError as inner:
            raise TrainFnError(f"train_fn raised: {secret}") from inner
    except TrainFnError as exc:
        chained = exc
    cases = [(chained, "TrainFnError", "the site's training function failed"),
             (sw.OutOfStep(secret), "OutOfStep", sw.FIXED_MESSAGES[sw.OutOfStep]),
             (fs.InvalidUpdate(secret), "InvalidUpdate", sw.FIXED_MESSAGES[fs.InvalidUpdate]),
             (ValueError(secret), "SiteError", "the site could not answer this request"),
             (_Custom(secret), "SiteError", "the site could not answer this request")]
    for exc, kind, message in cases:
        reply = sw.error_reply(exc)
        assert reply == {"ok": False, "error-type": kind, "error": message}
        assert secret not in json.dumps(reply)
    # a key set-up refusal also says what it refuses: text the protocol composes from the
    # request's own values (e.g. the setting below the site's floor), capped
    refusal = fs.KeySetupError("party 0 refuses: verify_aggregates=False (floor: True)" * 20)
    reply = sw.error_reply(refusal)
    assert reply["error"] == sw.FIXED_MESSAGES[fs.KeySetupError]
    assert reply["detail"].startswith("party 0 refuses: verify_aggregates=False")
    assert len(reply["detail"]) == sw.MAX_DETAIL


def test_metrics_policies(tmp_path):
    """What each policy lets leave a site, and that the server's typed messages take it."""
    train = TrainReply(party=1, round=2, train_loss=0.7, kept_fraction=0.5,
                       seconds={"train": 1.0, "prune": 0.1, "encrypt": 0.2}, update_norm=3.0,
                       metrics={"loss": 0.7, "acc": 0.9}).to_fields()
    evaluation = EvalReply(party=1, version=2, eval_loss=0.6, eval_examples=4,
                           seconds_decrypt=0.3, budget_left=9, adapter_fp="ab").to_fields()
    join = SiteInfo(party=1, name="a", data="/srv/a.jsonl", train_examples=12, eval_examples=4,
                    eval_loss=0.9, context_fp="cd", identity="ef").to_fields()
    assert sw.withhold(train, "all") == train
    kept = sw.withhold(train, "aggregate")
    assert sorted(kept) == ["kept", "party", "round"]
    got = TrainReply.from_fields(kept, b"u", signature=b"s")
    assert got.train_loss is None and got.metrics is None and got.update_norm is None
    assert sorted(sw.withhold(evaluation, "aggregate")) == [
        "adapter-fp", "budget-left", "eval-examples", "eval-loss", "party", "version"]
    none = EvalReply.from_fields(sw.withhold(evaluation, "none"))
    assert none.eval_loss is None and none.budget_left == 9 and none.eval_examples == 4
    info = SiteInfo.from_fields(sw.withhold(join, "aggregate"))
    assert info.data == "" and info.eval_loss == 0.9 and info.train_examples == 12
    assert SiteInfo.from_fields(sw.withhold(join, "none")).eval_loss is None
    assert sw.withhold({"seconds": 0.2}, "aggregate") == {}


# -- at rest -----------------------------------------------------------------------------------

def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_files_that_hold_state_or_logs_are_private(tmp_path):
    """Checkpoints (model state), the global adapters a site keeps, the worker's log, its
    token, identity and socket: mode 0600 (the socket 0660: its directory decides who may
    connect), all in the run's or the site's own directory (0700)."""
    from fedshield.run.checkpoint import save_checkpoint
    from fedshield.fl.adapter_store import AdapterStore

    save_checkpoint(tmp_path / "run", round_idx=1, state={"w": torch.ones(3)},
                    metrics={"rounds": [{"round": 1}]}, config={})
    files = sorted((tmp_path / "run" / "checkpoint").iterdir())
    assert [f.name for f in files] == ["checkpoint.json", "state-r000001.safetensors"]
    assert all(_mode(f) == 0o600 for f in files), [oct(_mode(f)) for f in files]
    store = AdapterStore(tmp_path / "global")
    store.save(1, {"w": torch.ones(3)})
    assert all(_mode(f) == 0o600 for f in (tmp_path / "global").iterdir())

    site_cfg = site_config(tmp_path)
    Path(site_cfg.node_dir).chmod(0o755)   # the worker closes what was left open
    config = site_cfg.save(tmp_path / "site.toml")
    in_tmp = set(Path("/tmp").glob("fedshield-*"))   # other runs on this machine leave theirs
    proc = subprocess.Popen([sys.executable, "-m", "fedshield.cli", "site", "worker",
                             "--config", str(config), "--exit-with", str(os.getpid())],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        relay_ready(site_cfg, proc)
        node = Path(site_cfg.node_dir)
        assert _mode(node) == 0o700
        for name in ("relay.token", "identity.key", "worker.log"):
            assert _mode(node / name) == 0o600, name
        assert _mode(node / "worker.sock") == 0o660
        assert set(Path("/tmp").glob("fedshield-*")) <= in_tmp
    finally:
        proc.terminate()
        proc.wait(30)
    assert proc.returncode == 0 and not (Path(site_cfg.node_dir) / "worker.sock").exists()


def relay_ready(site_cfg: SiteConfig, proc, timeout: float = 300) -> Relay:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
        try:
            relay = Relay(site_cfg.path("socket"), read_token(site_cfg.path("token_file")))
            relay.request("ping", {}, timeout=10)
            return relay
        except fs.FedShieldError:
            time.sleep(0.2)
    raise AssertionError("the site worker did not answer")


# -- accounts ----------------------------------------------------------------------------------

def _closed_to_others(path: Path) -> Path | None:
    """The first directory on the way to ``path`` (or the file) that other accounts cannot
    pass; None when they can."""
    path = Path(os.path.realpath(path))
    for step in [*reversed(path.parents), path]:
        if _mode(step) & 0o001 == 0:
            return step
    return None


@pytest.mark.skipif(os.geteuid() != 0, reason="separating the worker's account from the "
                    "SuperNode's needs root (files chowned to, and processes run as, other "
                    "uids); not root here")
def test_the_supernode_account_cannot_read_what_the_site_worker_holds():
    """The production layout: the worker runs under its own account (node directory 0700),
    the SuperNode under another that has only the socket (a shared directory) and a copy of
    the relay token. That account reads neither the key, the identity, the data, the site
    config, the token in the node directory nor the worker's log, and over the relay it gets
    only protocol answers. Where this Python is not reachable by other accounts (a pyenv under
    /root), the worker runs as root and the SuperNode's account reads with /usr/bin/cat; the
    relay part then needs that Python and is left to the tests above (same code, same uid)."""
    relay_uid = 61002                  # no such account: nothing else owns its files
    closed = _closed_to_others(Path(sys.executable))
    worker_uid = 61001 if closed is None else 0
    # pytest's own directories are closed to other accounts: a directory they can traverse
    base = Path(tempfile.mkdtemp(prefix="fedshield-accounts-"))
    try:
        got = _accounts(base, worker_uid, relay_uid, python_for_relay=closed is None)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    for name in ("party.key", "identity.key", "data.jsonl", "site.toml", "worker.log",
                 "relay.token"):
        assert got["read"][name] == "PermissionError", (name, got["read"][name])
    if closed is None:
        assert got["ping"] == [{}, []]
        assert all(answer == REFUSED for answer in got["outside"].values()), got["outside"]
        assert got["settings"].startswith("RunConfigRefused")
    else:
        print(f"relay part not run as uid {relay_uid}: {closed} is closed to other accounts")


def _accounts(base: Path, worker_uid: int, relay_uid: int, python_for_relay: bool) -> dict:
    base.chmod(0o711)
    shared = base / "relay"            # the socket's directory: both accounts reach it
    shared.mkdir(mode=0o770)
    os.chown(shared, worker_uid, relay_uid)
    node = base / "node"
    site_cfg = site_config(base, socket=str(shared / "worker.sock"))
    config = site_cfg.save(node / "site.toml")
    (node / "party.key").write_bytes(b"secret key material")   # what the key set-up writes
    (node / "party.key").chmod(0o600)
    for f in [node, *node.iterdir()]:
        os.chown(f, worker_uid, worker_uid)
    env = {**os.environ, "HOME": str(node), "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "fedshield.cli", "site", "worker",
                             "--config", str(config), "--exit-with", str(os.getpid())],
                            user=worker_uid, group=worker_uid, extra_groups=[relay_uid],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        relay_ready(site_cfg, proc)
        token_copy = base / "relay.token"     # what the site admin hands to the SuperNode
        token_copy.write_bytes((node / "relay.token").read_bytes())
        os.chown(token_copy, relay_uid, relay_uid)
        token_copy.chmod(0o400)
        as_relay = dict(user=relay_uid, group=relay_uid, capture_output=True, timeout=300,
                        env={**env, "HOME": str(base)})
        if python_for_relay:
            probe = subprocess.run([sys.executable, str(APPS / "account_probe.py"), str(node),
                                    str(shared / "worker.sock"), str(token_copy)],
                                   text=True, **as_relay)
            assert probe.returncode == 0, probe.stderr[-3000:]
            return json.loads(probe.stdout.strip().splitlines()[-1])
        read = {}
        for name in ("party.key", "identity.key", "data.jsonl", "site.toml", "worker.log",
                     "relay.token"):
            cat = subprocess.run(["/usr/bin/cat", str(node / name)], **as_relay)
            read[name] = ("PermissionError" if b"Permission denied" in cat.stderr
                          else len(cat.stdout))
        return {"read": read}
    finally:
        proc.terminate()
        proc.wait(30)


# -- a real deployment whose FAB is hostile ----------------------------------------------------

def test_a_hostile_clientapp_gets_nothing_and_a_failing_train_fn_leaks_nothing(tmp_path):
    """2 SuperNodes on loopback, threshold-free shared keys, 1 round; the server's FAB ships a
    ClientApp (tests/flower_apps/hostile_client.py) that, on both sites, asks each worker for
    operations outside the protocol, sends protocol operations with fields that would change
    the site's settings, and joins with a run config naming train_fn and the metrics policy:
    it gets refusals only (type and fixed message), and the run goes on with the sites' own
    settings. Site 1's own train_fn raises with its training rows, paths and plan in the
    message: the server's log and metrics.json hold neither, only the fixed text. Every file
    of the run that holds model state, keys or logs is mode 0600, none under /tmp."""
    pytest.importorskip("flwr")
    from fedshield.engines.flower.launcher import FlowerApp, run_flower

    out = tmp_path / "run"
    nodes = out / "flower" / "nodes"
    cfg = RunConfig.from_flat(clients=2, rounds=1, local_steps=2, examples_per_client=16,
                              lora_r=4, samples=0, prune="off", min_clients=1,
                              round_timeout=240.0, engine="flower", out=str(out))
    app = FlowerApp(client_app="hostile_client:app", files=[APPS / "hostile_client.py"])
    probes = [{"probe-dir": str(nodes / f"site-{i}"), "probe-out": str(tmp_path / f"probe-{i}")}
              for i in (0, 1)]
    got = run_flower(cfg, app=app, node_configs=probes,
                     node_env={"PYTHONPATH": str(APPS)},
                     site_settings=[{}, {"train_fn": "leaky_train:train",
                                         "metrics": "aggregate"}])
    assert [r["status"] for r in got["rounds"]] == ["ok"] and got["rounds"][0]["clients"] == [0]
    (event,) = got["events"]
    assert (event["party"], event["stage"]) == (1, "train")
    assert "TrainFnError: the site's training function failed" in event["reason"]
    # what the server side wrote and logged
    server_text = "".join(p.read_text(errors="replace") for p in [
        out / "metrics.json", out / "flower" / "logs" / "flwr-run.log",
        out / "flower" / "logs" / "superlink.log"])
    assert "TrainFnError: the site's training function failed" in server_text
    assert "LEAKED-ROW-TOKENS" not in server_text
    assert str(nodes / "site-1") not in server_text and "party.key" not in server_text
    assert got["sites"][1]["data"] == ""                       # site 1's policy: aggregate
    assert "LEAKED-ROW-TOKENS" in (nodes / "site-1" / "worker.log").read_text()
    # the hostile ClientApp's attempts over the relay: refusals only
    for i in (0, 1):
        attempts = [json.loads(line) for line in (tmp_path / f"probe-{i}").read_text().splitlines()]
        asked = [a for a in attempts if a["attempt"].startswith("op ")]
        assert {a["stage"] for a in asked} == {"join", "train"}, attempts
        for a in asked:
            assert isinstance(a["got"], str), a     # never fields or bytes
            kind, _, message = a["got"].partition(": ")
            assert kind in ("RequestRefused", "NotJoined", "RunConfigRefused",
                            "ParameterError"), a
            assert message in sw.FIXED_MESSAGES.values(), a
    # the sites kept their own settings: site 1 still trains with its own (failing) train_fn
    # and its policy; nothing left the sites' own directories
    saved = json.loads((out / "flower" / "sites.json").read_text())["sites"]
    for site in saved:
        assert sorted(site["node-config"]) == ["probe-dir", "probe-out", "socket",
                                               "token-file"]
    assert SiteConfig.from_file(nodes / "site-1" / "site.toml").train_fn == "leaky_train:train"
    assert not (Path("/tmp") / "stolen").exists() and not (Path("/tmp") / "stolen.key").exists()
    # at rest
    private = [*nodes.glob("*/party.key*"), *nodes.glob("*/identity.key"),
               *nodes.glob("*/global/*"), *nodes.glob("*/worker.log"),
               *nodes.glob("*/relay.token"), *nodes.glob("*/site.toml"),
               *(out / "flower" / "logs").glob("*.log")]
    assert len(private) >= 12
    assert all(_mode(p) == 0o600 for p in private), [(str(p), oct(_mode(p))) for p in private
                                                      if _mode(p) != 0o600]
    assert all(_mode(d) == 0o700 for d in nodes.iterdir())


def test_importing_the_flower_apps_changes_no_logger():
    """Flower imports the ServerApp and ClientApp modules in processes of its own and in the
    caller's (`flwr run` reads the app): fedshield's records go to Flower's handlers only once
    an app runs."""
    code = ("import logging; import flwr.common.logger; "
            "import fedshield.engines.flower.client_app, fedshield.engines.flower.server_app; "
            "ours = logging.getLogger('fedshield'); "
            "assert not ours.handlers and ours.propagate, (ours.handlers, ours.propagate)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_a_preloaded_run_is_the_joined_one_and_another_run_loads_its_own(tmp_path):
    """`fedshield site worker --preload-run` builds the run's site while Flower starts; the
    join adopts it for the same run only, and until the join a round request is refused."""
    site_cfg = site_config(tmp_path, insecure_trust_server_roster=True)
    cfg = RunConfig.from_flat(clients=2, rounds=1, local_steps=1, examples_per_client=16,
                              lora_r=2, samples=0, he=False)
    run = json.dumps({"fedshield-config": json.dumps(cfg.to_dict()), "out-dir": "/srv/run"})
    worker = sw.SiteWorker(site_cfg)
    worker.preload(run)
    worker.preloading.join(300)
    preloaded = worker.preloaded[1]
    assert worker.site is None
    with pytest.raises(sw.NotJoined):
        worker.handle("train", {"round": 1}, [])
    worker.handle("join", {"resume": False, "run-config": run}, [])
    assert worker.site is preloaded and worker.preloaded is None
    other = json.dumps({"fedshield-config": json.dumps(
        cfg.replace(lr=cfg.training.lr / 2).to_dict())})
    worker.handle("join", {"resume": False, "run-config": other}, [])
    assert worker.site is not preloaded and worker.site.cfg.training.lr == cfg.training.lr / 2
    # a run config the site refuses is not preloaded; the join says why
    refused = sw.SiteWorker(site_cfg)
    refused.preload(json.dumps({"fedshield-config": "{}", "train-fn": "os:system"}))
    refused.preloading.join(60)
    assert refused.preloaded is None


def test_a_join_waits_for_a_worker_still_starting_and_no_other_request_does(tmp_path,
                                                                            monkeypatch):
    """fedshield's relay holds a join until the worker has written its token and listens
    (the launcher starts the run while its workers import torch); any other request, and a
    join past JOIN_WAIT, fails at once with the fixed RelayError."""
    pytest.importorskip("flwr")
    from flwr.common import Context, RecordDict

    from fedshield.engines.flower import client_app
    from fedshield.engines.flower.site_ipc import NODE_SOCKET, NODE_TOKEN, SiteWorkerError

    site_cfg = site_config(tmp_path)
    node = {NODE_SOCKET: str(site_cfg.path("socket")),
            NODE_TOKEN: str(site_cfg.path("token_file"))}
    context = Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config={})
    start = time.monotonic()
    with pytest.raises(SiteWorkerError, match="RelayError: the site worker cannot be reached"):
        client_app.ask(context, "train", {"round": 1})
    assert time.monotonic() - start < client_app.JOIN_WAIT / 10
    monkeypatch.setattr(client_app, "JOIN_WAIT", 0.3)
    start = time.monotonic()
    with pytest.raises(SiteWorkerError, match="RelayError"):
        client_app.ask(context, "join", {})
    assert time.monotonic() - start >= 0.3
    monkeypatch.setattr(client_app, "JOIN_WAIT", 120.0)
    answered = threading.Event()

    def start_late() -> None:
        time.sleep(0.5)
        with worker_thread(site_cfg):
            answered.wait(60)

    late = threading.Thread(target=start_late, daemon=True)
    late.start()
    # the join reaches the worker once it listens: its refusal of this run config proves it
    run = json.dumps({"fedshield-config": "{}", "train-fn": "functools:partial"})
    try:
        with pytest.raises(WorkerRefused, match="^RunConfigRefused"):
            client_app.ask(context, "join", {"run-config": run})
    finally:
        answered.set()
        late.join(30)
