"""Checkpoints after every round and `fedshield run --resume DIR`: no round lost or repeated."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import fedshield as fs
from fedshield.run import checkpoint as ckpt_mod
from fedshield.run.checkpoint import capture_rng, load_checkpoint, restore_rng
from fedshield.cli.commands import main as cli_main
from fedshield.config import RunConfig
from fedshield.engines.local import LocalEngine, resume

from interrupting import interrupt, live_processes, start_run, wait_until

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
    real = ckpt_mod.write_atomic

    def fail_on_round_2_index(path, data, mode=0o644):
        if Path(path).name == ckpt_mod.INDEX and json.loads(data)["round"] == 2:
            raise OSError("disk full")
        real(path, data, mode)

    monkeypatch.setattr(ckpt_mod, "write_atomic", fail_on_round_2_index)
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
    rc = cli_main(["run", "--resume", str(tmp_path / "run"), "--lr", "0.5", "--overwrite",
                   "--no-progress"])
    assert rc == 2 and "drop ['--lr', '--overwrite']" in capsys.readouterr().err


def test_resume_extends_a_finished_run_and_the_schedules_follow_the_new_total(tmp_path,
                                                                                capsys):
    """--resume DIR --rounds N: the rounds done keep their learning rate and pruned fraction;
    the new ones get what an N-round run has there (a warm restart of the cosine), and the
    pruning target is reached at the new last round."""
    from fedshield.fl.schedule import cosine_lr

    cfg = RunConfig.from_flat(**{**SMALL, "rounds": 2, "prune": "local"}, he=False,
                              out=str(tmp_path / "run"))
    first = LocalEngine(cfg, show_progress=False).run()
    assert [r["prune_ratio"] for r in first["rounds"]] == pytest.approx([0.2, 0.5])
    rc = cli_main(["run", "--resume", str(tmp_path / "run"), "--rounds", "4", "--no-progress"])
    assert rc == 0
    assert "after 4 rounds" in capsys.readouterr().out
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [1, 2, 3, 4] and metrics["finished"]
    assert metrics["config"]["training"]["rounds"] == 4
    assert metrics["rounds_changed"] == [{"after_round": 2, "rounds": 4, "was": 2}]
    lr, lr_min = cfg.training.lr, cfg.training.lr_min
    assert [r["lr"] for r in metrics["rounds"]] == pytest.approx(
        [cosine_lr(0, 2, lr, lr_min), cosine_lr(1, 2, lr, lr_min),
         cosine_lr(2, 4, lr, lr_min), cosine_lr(3, 4, lr, lr_min)])
    assert [r["prune_ratio"] for r in metrics["rounds"]] == pytest.approx(
        [0.2, 0.5, 0.2 + 0.3 * 2 / 3, 0.5])
    assert metrics["rounds"][:2] == first["rounds"]  # the rounds done are kept as they were
    assert load_checkpoint(tmp_path / "run")["round"] == 4


def test_resume_may_shorten_a_run_but_not_below_its_completed_rounds(tmp_path, monkeypatch,
                                                                      capsys):
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        _crash_in_round(m, 3)
        with pytest.raises(Crash):
            LocalEngine(RunConfig.from_flat(**{**SMALL, "rounds": 5}, he=False, out=str(out)),
                        show_progress=False).run()
    assert cli_main(["run", "--resume", str(out), "--rounds", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"fedshield: error: --resume {str(out)!r}: --rounds 1 is fewer than the 2 "
                   "rounds the run has completed; give --rounds 2 or more")
    resumed = resume(out, show_progress=False, rounds=3)
    assert [r["round"] for r in resumed["rounds"]] == [1, 2, 3] and resumed["finished"]


# ~45 s on 2 cores; the default suite resumes after a crash in-process (above) and after a real
# SIGINT to a `fedshield run` process (below).
@pytest.mark.slow
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


INTERRUPTED = re.compile(r"fedshield: interrupted during round (\d+); (?:round 1 is|rounds "
                         r"1\.\.(\d+) are) saved; resume with `fedshield run --resume (.+)`")


@pytest.mark.parametrize("how", [
    "SIGINT to the process group",
    pytest.param("SIGTERM to the process", marks=pytest.mark.slow)])  # in-process test below
def test_a_signal_stops_a_run_with_one_line_and_it_resumes(tmp_path, how):
    """Ctrl-C at a terminal (SIGINT to the whole foreground group: the run and any child
    process) and a scheduler's SIGTERM (to the run alone): one line naming the
    round and the resume command, exit 130, every child process gone, the checkpoint whole;
    the resume finishes the run."""
    # r=256 on the tiny model: 131072 LoRA values, 9 ciphertexts (native threads, no process)
    args = ["--clients", "2", "--rounds", "3", "--examples-per-client", "16",
            "--local-steps", "10", "--batch-size", "4", "--lora-r", "256", "--samples", "0",
            "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "run"
    proc = start_run([*args, "--out", str(out)], env=env)
    index = out / "checkpoint" / "checkpoint.json"

    def session() -> list[dict]:
        return [p for p in live_processes() if p["session"] == proc.pid]

    def ready() -> bool:
        return index.is_file()

    def send() -> None:
        if how.startswith("SIGINT"):
            os.killpg(proc.pid, signal.SIGINT)
        else:
            proc.send_signal(signal.SIGTERM)

    last = interrupt(proc, ready, send)
    match = INTERRUPTED.fullmatch(last)
    assert match, last
    done = load_checkpoint(out)["round"]  # whole, and the round the line names
    assert int(match.group(1)) == done + 1 and int(match.group(2) or 1) == done
    assert match.group(3) == str(out)
    assert not list(out.rglob("*.tmp*")), "a temporary file was left behind"
    wait_until(lambda: not session(), 30, "the child processes to end")

    rc = subprocess.run([sys.executable, "-m", "fedshield.cli", "run", "--resume", str(out),
                         "--no-progress"], env=env, capture_output=True, timeout=300)
    assert rc.returncode == 0, rc.stderr.decode()[-2000:]
    resumed = json.loads((out / "metrics.json").read_text())
    assert [r["round"] for r in resumed["rounds"]] == [1, 2, 3] and resumed["finished"]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_in_a_round_stops_the_cli_with_one_line(tmp_path, monkeypatch, capsys,
                                                         signum):
    """The same handling in this process: the signal arrives while round 2 trains."""
    original = LocalEngine.run_round

    def run_round(self, round_idx, progress=None):
        if round_idx == 2:
            os.kill(os.getpid(), signum)
        return original(self, round_idx, progress)

    monkeypatch.setattr(LocalEngine, "run_round", run_round)
    out = tmp_path / "run"
    rc = cli_main(["run", "--clients", "2", "--rounds", "3", "--examples-per-client", "16",
                   "--local-steps", "2", "--lora-r", "4", "--samples", "0", "--no-he",
                   "--no-progress", "--out", str(out)])
    assert rc == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"fedshield: interrupted during round 2; round 1 is saved; resume with "
        f"`fedshield run --resume {out}`")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
    assert load_checkpoint(out)["round"] == 1 and not (out / "adapter").exists()
