"""A by-hand deployment restarted as docs/DEPLOYMENT.md says (issue 23): a SuperLink with
`--database`, site workers started from their own site configs, SuperNodes with Flower's
retry option and the app `flwr run` ships; the SuperLink (and the ServerApp it runs) is
SIGKILLed mid-run and restarted with the same command and database, the SuperNodes come back
by themselves, and `flwr run --run-config 'resume-state="…"'` finishes the run with
every round once."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("flwr")

from fedshield.config import RunConfig  # noqa: E402
from fedshield.engines.flower.deployment import Deployment, DeploymentError  # noqa: E402
from fedshield.engines.flower.launcher import (FlowerApp, executor_command,  # noqa: E402
                                               prepare_sites, write_app)
from fedshield.engines.flower.site_ipc import Relay, SiteWorkerError  # noqa: E402

from test_flower import TINY  # noqa: E402


def _recorded(metrics: Path) -> list[int]:
    try:
        return [r["round"] for r in json.loads(metrics.read_text()).get("rounds", [])]
    except (OSError, ValueError):
        return []


def wait_for_workers(sites, dep: Deployment) -> None:
    deadline = time.monotonic() + 600
    for i, site in enumerate(sites):
        while True:
            try:
                Relay.from_node_config(site.node).request("ping", {}, timeout=30.0)
                break
            except SiteWorkerError:
                assert dep.procs[f"worker-{i}"].poll() is None, f"worker {i} exited"
                assert time.monotonic() < deadline, "the site workers did not start"
                time.sleep(0.5)


@pytest.mark.slow
def test_a_killed_superlink_restarted_as_documented_finishes_every_round_once(tmp_path):
    cfg = RunConfig.from_flat(**{**TINY, "rounds": 3}, prune="off", engine="flower",
                              out=str(tmp_path / "run"))
    out = tmp_path / "run"
    work = out / "flower"
    sites, server_ctx = prepare_sites(cfg, work, out)
    write_app(work / "app", cfg, server_ctx, out, FlowerApp())
    metrics, state = out / "metrics.json", out / "server-state.json"
    database = work / "superlink.db"
    with Deployment(work, len(sites), [s.node for s in sites]) as dep:
        for i, site in enumerate(sites):   # each site's own worker, from its node directory
            dep.start(f"worker-{i}", [sys.executable, "-m", "fedshield.cli", "site", "worker",
                                      "--config", str(site.config)], cwd=site.config.parent)
        wait_for_workers(sites, dep)
        dep.start_superlink(database=database)
        for i in range(len(sites)):   # each with the site's own executor, as documented
            dep.start_supernode(i, executor=executor_command(FlowerApp()))

        def kill_after_round_1() -> None:
            if _recorded(metrics) and dep.procs["superlink"].poll() is None:
                os.killpg(dep.procs["superlink"].pid, signal.SIGKILL)   # its ServerApp too

        with pytest.raises(DeploymentError, match="superlink exited"):
            dep.run_app(work / "app", 900, on_poll=kill_after_round_1)
        dep.procs["superlink"].wait()
        done = _recorded(metrics)
        assert done and state.is_file() and not json.loads(metrics.read_text())["finished"]

        # the documented restart: the same SuperLink command and database; the SuperNodes,
        # still retrying, come back by themselves; the run goes on from its recorded state
        dep.start_superlink(database=database)
        assert all(dep.procs[f"supernode-{i}"].poll() is None for i in range(len(sites)))
        code = dep.run_app(work / "app", 900, run_config={"resume-state": str(state)})
        deadline = time.monotonic() + 60
        while not json.loads(metrics.read_text()).get("finished") and time.monotonic() < deadline:
            time.sleep(0.5)
    got = json.loads(metrics.read_text())
    assert code == 0 and got["finished"], got.get("failure")
    assert [r["round"] for r in got["rounds"]] == [1, 2, 3]
    assert [r["status"] for r in got["rounds"]] == ["ok"] * 3
    assert got["resumed"][0]["after_round"] == done[-1]


@pytest.mark.slow   # ~25 s on 2 loaded cores: two Flower processes start
def test_a_supernode_that_cannot_reach_its_superlink_says_so_in_bounded_time(tmp_path,
                                                                              monkeypatch):
    """No SuperLink listens: the SuperNode gives up after Flower's --max-wait-time, which the
    launcher sets, and the launcher's error says why in its own words."""
    from fedshield.engines.flower import deployment

    monkeypatch.setattr(deployment, "SUPERNODE_MAX_WAIT", 2)
    with Deployment(tmp_path, 1, [{}]) as dep:
        start = time.monotonic()
        proc = dep.start_supernode(0)
        proc.wait(timeout=120)
        with pytest.raises(DeploymentError, match=r"supernode-0 exited with code \d+ \(it could "
                                                  r"not reach the SuperLink within 2 s\)"):
            dep.check_alive()
    assert time.monotonic() - start < 120
