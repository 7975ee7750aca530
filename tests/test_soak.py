"""Soak (slow set): many clients through the native aggregator, and many SuperNodes with random
faults through real Flower processes. Each test bounds its time and prints what it measured
(time, peak memory); set FEDSHIELD_SOAK_JSON=DIR to also keep the figures as JSON."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fedshield.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from soak_aggregate import soak  # noqa: E402

from process_sampling import PeakMemory  # noqa: E402

pytestmark = pytest.mark.slow


def _keep(name: str, figures: dict) -> None:
    print(f"{name}: {json.dumps(figures)}")
    out = os.environ.get("FEDSHIELD_SOAK_JSON")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / f"{name}.json").write_text(json.dumps(figures, indent=1))


def test_hundred_clients_through_the_native_aggregator(tmp_path):
    """100 updates of 1M values, streamed from disk into one sum by a server process of its
    own: exact within the tolerance, and the server's memory stays far below the updates'."""
    figures = soak(100, 1 << 20, tmp_path)
    _keep("soak_aggregate", figures)
    assert figures["max_abs_err"] <= figures["tolerance"]
    assert figures["server_loaded_torch"] is False
    growth = figures["server_peak_rss_after_mb"] - figures["server_peak_rss_before_mb"]
    # streaming: a few updates' worth, not the 100 that went through
    assert growth < 0.2 * figures["all_updates_mb"], figures


def test_twenty_supernodes_with_random_faults(tmp_path):
    """20 SuperNodes, 3 rounds, shared keys set up over Flower; a seeded random third of the
    sites misbehave once each (their ClientApp dies, raises, replies late, sends garbage or
    replays). Every round completes with the others, every faulty reply is excluded with its
    reason, nobody else is, and the loss goes down."""
    pytest.importorskip("flwr")
    sys.path.insert(0, str(ROOT / "tests"))
    from test_flower import faulty_app

    from fedshield.engines.flower.launcher import run_flower

    n, rounds = 20, 3
    rng = np.random.default_rng(2026)
    kinds = ["exit", "raise", "sleep", "garbage", "replay"]
    faulty = sorted(rng.choice(np.arange(1, n), size=7, replace=False).tolist())
    faults = [{} for _ in range(n)]
    expected = {}
    for i, party in enumerate(faulty):
        kind = kinds[i % len(kinds)]
        at = 2 if kind == "replay" else int(rng.integers(1, rounds + 1))
        faults[party] = {"fault": f"{kind}@{at}", "sleep": 200}
        expected[party] = (at, kind)
    cfg = RunConfig.from_flat(clients=n, rounds=rounds, local_steps=1, examples_per_client=8,
                              batch_size=4, round_timeout=120.0, engine="flower",
                              out=str(tmp_path / "soak"))
    start = time.perf_counter()
    with PeakMemory() as memory:
        got = run_flower(cfg, app=faulty_app(), node_configs=faults)
    seconds = time.perf_counter() - start
    _keep("soak_flower", {"supernodes": n, "rounds": rounds, "faults": {
        str(p): f"{k}@{a}" for p, (a, k) in expected.items()}, "seconds": round(seconds, 1),
        "peak_rss_mb_all_processes": round(memory.peak_mb), "processes_at_peak": memory.processes,
        "rounds_status": [r["status"] for r in got["rounds"]],
        "clients_per_round": [len(r["clients"]) for r in got["rounds"]]})
    assert [r["status"] for r in got["rounds"]] == ["ok"] * rounds
    excluded = {(e["round"], e["party"]) for e in got["events"]}
    # every fault shows up as an exclusion at its round (a replay in round 1 has nothing to
    # replay, and a party dropped earlier never gets to its fault)
    dropped: dict[int, int] = {}
    for e in got["events"]:
        if e.get("dropped"):
            dropped.setdefault(e["party"], e["round"])
    for party, (at, kind) in expected.items():
        if party in dropped and dropped[party] < at:
            continue
        assert (at, party) in excluded, (party, kind, at, got["events"])
    assert {p for _, p in excluded} <= set(expected), got["events"]
    assert got["rounds"][-1]["eval_loss"] < got["initial_eval_loss"]
    assert got["server_loaded_openfhe"] is False
