"""Checkpoints after every round and `fedshield run --resume DIR`: no round lost or repeated."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import fedshield as fs
from fedshield import checkpoint as ckpt_mod
from fedshield.checkpoint import capture_rng, load_checkpoint, restore_rng
from fedshield.cli import main as cli_main
from fedshield.config import RunConfig
from fedshield.local_engine import LocalEngine, resume

SMALL = dict(clients=2, rounds=3, examples_per_client=16, local_steps=2,
             batch_size=4, lora_r=4, samples=1, sample_tokens=4, prune="global")


class Crash(RuntimeError):
    pass


def _crash_in_round(monkeypatch, crash_round):
    original = LocalEngine.run_round

    def run_round(self, round_idx, progress=None):
        if round_idx == crash_round:
            self.server.plan(round_idx)  # mid-round: some of the round's work is done
            raise Crash(f"killed in round {round_idx}")
        return original(self, round_idx, progress)

    monkeypatch.setattr(LocalEngine, "run_round", run_round)


@pytest.mark.parametrize("he", [False, True])
def test_resume_after_a_crash_equals_the_uninterrupted_run(tmp_path, monkeypatch, he):
    full = LocalEngine(RunConfig.from_flat(**SMALL, he=he, out=str(tmp_path / "full")),
                       show_progress=False).run()
    out = tmp_path / "crashed"
    with monkeypatch.context() as m:
        _crash_in_round(m, 3)
        with pytest.raises(Crash):
            LocalEngine(RunConfig.from_flat(**SMALL, he=he, out=str(out)), show_progress=False).run()
    saved = json.loads((out / "metrics.json").read_text())
    assert [r["round"] for r in saved["rounds"]] == [1, 2]
    assert not (out / "adapter").exists()
    resumed = resume(out, show_progress=False)
    assert [r["round"] for r in resumed["rounds"]] == [1, 2, 3]
    # Plaintext is deterministic; with HE only the CKKS noise of the aggregation differs.
    tol = 1e-5 if he else 0.0
    for a, b in zip(resumed["rounds"], full["rounds"]):
        assert a["eval_loss"] == pytest.approx(b["eval_loss"], abs=tol)
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=tol)
    assert json.loads((out / "metrics.json").read_text())["rounds"][-1]["round"] == 3
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    state = load_checkpoint(out)
    assert state["round"] == 3


def test_checkpoint_holds_state_round_rng_and_metrics(tmp_path):
    cfg = RunConfig.from_flat(**{**SMALL, "rounds": 2}, he=False, out=str(tmp_path))
    sim = LocalEngine(cfg, show_progress=False)
    metrics = sim.run()
    ckpt = load_checkpoint(tmp_path)
    assert ckpt["round"] == 2 and ckpt["config"] == cfg.to_dict()
    assert ckpt["metrics"]["rounds"] == metrics["rounds"]
    assert all(torch.equal(ckpt["state"][k], sim.global_state[k]) for k in sim.global_state)
    assert sorted(p.name for p in (tmp_path / "checkpoint").iterdir()) == [
        "checkpoint.json", "state-r000002.safetensors"]  # the round-1 state was removed


def test_rng_states_round_trip():
    import random

    import numpy as np

    saved = capture_rng()
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.rand(5), np.random.rand(5), random.random()
    restore_rng(*saved)
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(got[0], expected[0]) and (got[1] == expected[1]).all()
    assert got[2] == expected[2]


def test_a_crash_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    cfg = RunConfig.from_flat(**SMALL, he=False, out=str(tmp_path))
    real = ckpt_mod.write_json_atomic

    def fail_on_round_2_index(path, obj, indent=2):
        if path.name == ckpt_mod.INDEX and obj["round"] == 2:
            raise OSError("disk full")
        real(path, obj, indent)

    monkeypatch.setattr(ckpt_mod, "write_json_atomic", fail_on_round_2_index)
    with pytest.raises(OSError, match="disk full"):
        LocalEngine(cfg, show_progress=False).run()
    ckpt = load_checkpoint(tmp_path)
    assert ckpt["round"] == 1 and len(ckpt["metrics"]["rounds"]) == 1


def test_resume_refuses_missing_corrupt_or_overridden_checkpoints(tmp_path, capsys):
    with pytest.raises(fs.ParameterError, match="no checkpoint"):
        resume(tmp_path / "nothing")
    cfg = RunConfig.from_flat(**{**SMALL, "rounds": 1}, he=False, out=str(tmp_path / "run"))
    LocalEngine(cfg, show_progress=False).run()
    index = tmp_path / "run" / "checkpoint" / "checkpoint.json"
    good = index.read_text()
    index.write_text(good[:50])
    with pytest.raises(fs.ParameterError, match="unreadable"):
        resume(tmp_path / "run")
    data = json.loads(good)
    data["metrics"]["rounds"] = []
    index.write_text(json.dumps(data))
    with pytest.raises(fs.ParameterError, match="unreadable"):
        resume(tmp_path / "run")
    index.write_text(good)
    (tmp_path / "run" / "checkpoint" / data["state_file"]).write_bytes(b"garbage")
    with pytest.raises(fs.ParameterError, match="unreadable"):
        resume(tmp_path / "run")
    rc = cli_main(["run", "--resume", str(tmp_path / "run"), "--rounds", "5", "--no-progress"])
    assert rc == 2 and "drop ['rounds']" in capsys.readouterr().err


def test_killing_a_run_mid_round_then_resuming_loses_and_repeats_nothing(tmp_path):
    """A real `fedshield run` process is SIGKILLed while a round is in flight."""
    args = ["--clients", "2", "--rounds", "5", "--examples-per-client", "16",
            "--local-steps", "40", "--batch-size", "4",
            "--lora-r", "4", "--samples", "0", "--no-he", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "fedshield.cli", "run", *args, "--out",
                             str(out)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    index = out / "checkpoint" / "checkpoint.json"
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if index.is_file() and json.loads(index.read_text())["round"] >= 2:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    done = json.loads(index.read_text())["round"]
    assert 2 <= done < 5
    rc = subprocess.run([sys.executable, "-m", "fedshield.cli", "run", "--resume", str(out),
                         "--no-progress"], env=env, capture_output=True, timeout=300)
    assert rc.returncode == 0, rc.stderr.decode()[-2000:]
    resumed = json.loads((out / "metrics.json").read_text())
    assert [r["round"] for r in resumed["rounds"]] == [1, 2, 3, 4, 5]
    rc = subprocess.run([sys.executable, "-m", "fedshield.cli", "run", *args, "--out",
                         str(tmp_path / "whole")], env=env, capture_output=True, timeout=300)
    assert rc.returncode == 0, rc.stderr.decode()[-2000:]
    whole = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    assert [r["eval_loss"] for r in resumed["rounds"]] == [r["eval_loss"] for r in whole["rounds"]]
