"""The site's own ClientApp executor (fedshield.engines.flower.site_executor): a SuperNode
with ``--isolation process`` gets its messages answered by the relay of the site's install, in
one process; the server's app package never runs on the site."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("flwr")

from fedshield.config import RunConfig  # noqa: E402
from fedshield.engines.flower import site_executor  # noqa: E402
from fedshield.engines.flower.deployment import Deployment  # noqa: E402
from fedshield.engines.flower.launcher import (FlowerApp, executor_command,  # noqa: E402
                                               prepare_sites, write_app)

from test_flower import APPS, TINY  # noqa: E402
from test_flower_restart import wait_for_workers  # noqa: E402


def test_the_executor_speaks_this_flower_release():
    assert site_executor.UNAVAILABLE is None
    assert executor_command(FlowerApp()) is not None
    # an app with another ClientApp runs in Flower's own processes (the fault tests' apps)
    assert executor_command(FlowerApp(client_app="faulty_client:app")) is None


def test_the_executor_command_wants_tls_or_an_explicit_insecure():
    done = subprocess.run([sys.executable, "-m", "fedshield.cli", "site", "executor",
                           "--clientappio-api-address", "127.0.0.1:9"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "one of the arguments --root-certificates --insecure is required" in done.stderr


def test_the_executor_waits_for_its_supernode_and_stops_when_asked():
    stop = threading.Event()
    worker = threading.Thread(target=site_executor.serve, args=("127.0.0.1:9",),
                              kwargs={"stop": stop})
    worker.start()
    time.sleep(1.5)                  # nothing listens: it keeps asking
    assert worker.is_alive()
    stop.set()
    worker.join(timeout=10)
    assert not worker.is_alive()


@pytest.mark.slow   # ~60 s: a real SuperLink, two SuperNodes and their executors
def test_the_servers_clientapp_never_runs_on_a_site_with_the_executor(tmp_path):
    """The app package names a ClientApp that leaves a marker when imported; the SuperNodes
    run with the site executor, and the run finishes without it ever being imported."""
    marker = tmp_path / "server-code-ran"
    cfg = RunConfig.from_flat(**{**TINY, "rounds": 1}, engine="flower",
                              out=str(tmp_path / "run"))
    out = tmp_path / "run"
    work = out / "flower"
    sites, server_ctx = prepare_sites(cfg, work, out)
    write_app(work / "app", cfg, server_ctx, out,
              FlowerApp(client_app="marker_client:app", files=[APPS / "marker_client.py"]))
    with Deployment(work, len(sites), [s.node for s in sites],
                    env={"FEDSHIELD_TEST_MARKER": str(marker)}) as dep:
        for i, site in enumerate(sites):
            dep.start(f"worker-{i}", [sys.executable, "-m", "fedshield.cli", "site", "worker",
                                      "--config", str(site.config)], cwd=site.config.parent)
        dep.start_superlink()
        for i in range(len(sites)):
            dep.start_supernode(i, executor=executor_command(FlowerApp()))
        wait_for_workers(sites, dep)
        assert dep.run_app(work / "app", 900) == 0
    got = json.loads((out / "metrics.json").read_text())
    assert got["finished"] and [r["status"] for r in got["rounds"]] == ["ok"], got.get("failure")
    assert not marker.exists()


def test_a_missing_root_certificate_is_one_error_line(tmp_path):
    missing = tmp_path / "ca.crt"
    done = subprocess.run([sys.executable, "-m", "fedshield.cli", "site", "executor",
                           "--clientappio-api-address", "127.0.0.1:9",
                           "--root-certificates", str(missing)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == \
        f"fedshield: error: --root-certificates {missing}: No such file or directory"
