"""The same ServerApp and ClientApp on Flower's simulation runtime (ray; flwr[simulation]):
many sites on one node, each declaring its CPUs and GPU fraction, virtual SuperNodes finding
their node config by partition id."""

from __future__ import annotations

import json

import pytest
import torch

import fedshield as fs
from fedshield.config import RunConfig
from fedshield.engines.flower.launcher import SiteResources

flwr = pytest.importorskip("flwr")


def test_site_resources():
    r = SiteResources(cpus=2, gpus=0.5, devices=(0, 1))
    assert [r.env(i)["CUDA_VISIBLE_DEVICES"] for i in range(5)] == ["0", "0", "1", "1", "0"]
    assert r.env(0)["FEDSHIELD_NUM_THREADS"] == "2"
    assert r.federation_config(4) == {"num-supernodes": 4, "client-resources-num-cpus": 2,
                                      "client-resources-num-gpus": 0.5}
    assert SiteResources().env(3)["CUDA_VISIBLE_DEVICES"] == ""    # CPU only: no GPU at all
    for bad, match in [(dict(cpus=0), "cpus=0"), (dict(gpus=1.5), "gpus=1.5"),
                       (dict(gpus=0.5, devices=()), "devices")]:
        with pytest.raises(fs.ParameterError, match=match):
            SiteResources(**bad)


def test_a_virtual_supernode_finds_its_node_config():
    """A virtual SuperNode's relay settings (the site worker's socket and token) come from the
    run config by partition id; a real SuperNode's from its own node config."""
    pytest.importorskip("flwr.clientapp")
    from flwr.common import Context, RecordDict

    from fedshield.engines.flower.client_app import node_config

    sites = [{"socket": "a/worker.sock", "token-file": "a/relay.token"},
             {"socket": "b/worker.sock", "token-file": "b/relay.token"}]
    run = {"simulation-sites": json.dumps(sites)}
    virtual = Context(run_id=1, node_id=7, node_config={"partition-id": 1,
                                                        "num-partitions": 2},
                      state=RecordDict(), run_config=run)
    assert node_config(virtual) == sites[1]
    own = {"socket": "own.sock", "token-file": "own.token"}
    real = Context(run_id=1, node_id=7, node_config=own, state=RecordDict(), run_config=run)
    assert node_config(real) == own


# ~2 min on 2 cores (ray starts its cluster); `make test-all` runs it. The default suite checks
# how the simulation's virtual SuperNodes find their sites (above).
@pytest.mark.slow
def test_simulation_runtime_matches_local_engine(tmp_path, monkeypatch):
    """2 sites of 1 CPU each on the simulation runtime, 2 rounds: the same rounds as the local
    engine (and the deployment runtime, tests/test_flower.py) for the same seed."""
    pytest.importorskip("ray")
    from fedshield.engines.flower.launcher import run_flower
    from test_flower import TINY, local_reference, saved_adapter

    cfg = RunConfig.from_flat(**TINY, prune="off", engine="flower", out=str(tmp_path / "sim"))
    got = run_flower(cfg, simulation=SiteResources(cpus=1))
    ref = local_reference(cfg, tmp_path / "local", monkeypatch)
    assert got["server_has_secret_key"] is False
    assert [r["status"] for r in got["rounds"]] == ["ok", "ok"] and got["events"] == []
    assert got["initial_eval_loss"] == pytest.approx(ref["initial_eval_loss"], abs=1e-9)
    for a, b in zip(got["rounds"], ref["rounds"]):
        assert a["clients"] == [0, 1]
        assert a["eval_loss"] == pytest.approx(b["eval_loss"], abs=1e-5)
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-5)
        assert a["bytes_up"] == b["bytes_up"]
    x, y = saved_adapter(tmp_path / "sim"), saved_adapter(tmp_path / "local")
    for k in x:
        torch.testing.assert_close(x[k], y[k], atol=1e-4, rtol=0)
    assert "Starting Flower Simulation" in (tmp_path / "sim" / "flower" / "logs" /
                                            "flwr-run.log").read_text(errors="replace")
