"""What a new user meets at the command line: help texts, one-line errors on bad input before
any heavy work, a run directory never replaced without --overwrite, and what an interrupted
run says."""

from __future__ import annotations

import argparse
import json
import logging
import re

import pytest

import fedshield.engines.local as local_engine
from fedshield.cli.commands import add_commands, flower_interrupted, local_interrupted
from fedshield.cli.commands import main as cli_main

SMALL = ["--clients", "2", "--examples-per-client", "16", "--local-steps", "2",
         "--lora-r", "4", "--samples", "0", "--no-progress"]


def _subparsers():
    """(name, parser) of every `fedshield` command, as main() builds them."""
    parser = argparse.ArgumentParser(prog="fedshield")
    sub = parser.add_subparsers(dest="command")
    add_commands(sub)
    return sorted(sub.choices.items())


def _help_entries(page: str) -> list[str]:
    """Each option's or positional's entry of a help page (argparse indents an entry by two
    spaces and its continuation lines by more), continuation lines joined."""
    entries: list[str] = []
    within = False
    for line in page.splitlines():
        if re.match(r"  \S", line):
            entries.append(line.strip())
            within = True
        elif within and line.startswith("   "):
            entries[-1] += " " + line.strip()
        else:
            within = False
    return entries


@pytest.mark.parametrize("name, parser", _subparsers(), ids=lambda x: x if isinstance(x, str)
                         else "")
def test_help_states_each_default_once(name, parser):
    for entry in _help_entries(parser.format_help()):
        assert entry.count("default") <= 1, f"{name}: {entry}"
        assert "(default: None)" not in entry and "(default: )" not in entry, entry
    page = re.sub(r"\s+", " ", parser.format_help())
    assert "(default: None)" not in page and not re.search(r"\(default: [^)]*\) \(default:", page)


def test_eval_help_names_the_model_default_once():
    page = re.sub(r"\s+", " ", dict(_subparsers())["eval"].format_help())
    assert "base model directory (default: the one the adapter names)" in page
    assert "--samples SAMPLES prompts to answer (default: 3)" in page


def test_dropouts_help_says_a_threshold_is_needed():
    page = re.sub(r"\s+", " ", dict(_subparsers())["run"].format_help())
    assert "needs --threshold T with T <= sites - K, e.g. --clients 3 --threshold 2 " \
           "--dropouts 1" in page


def _forbid(monkeypatch, *names: str) -> None:
    def heavy(*args, **kwargs):
        raise AssertionError("heavy work started before the bad input was refused")

    for name in names:
        monkeypatch.setattr(local_engine, name, heavy)


@pytest.fixture
def no_heavy_work(monkeypatch):
    """Fails the test if a run gets as far as the tokenizer, the model or the keys."""
    _forbid(monkeypatch, "load_tokenizer", "build_lora_model", "deal_keys")


def _one_line_error(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedshield: error: "), captured.err
    return lines[0]


@pytest.mark.parametrize("argv, config, expected", [
    (["--max-len", "5"], None, "max_len=5 is too short: a training example needs at least 11 "
                               "tokens"),
    ([], b"\xff\xfe\x00binary", "not UTF-8 text"),
    ([], b"[pruning]\nt_end = 1\n", "prune_t_end=1 must be greater than prune_t_start=1"),
    ([], b"[pruning]\nt_start = 5\n[training]\nrounds = 3\n",
     "prune_t_start=5 is after the run's last round (rounds=3)"),
    ([], b"[pruning]\nt_end = -2\n", "prune_t_end=-2 must be an int >= 0"),
    (["--keys", "threshold", "--dropouts", "1"], None,
     "dropouts=1 needs --threshold T with T <= 3 - 1: the default threshold (0) needs all 3 "
     "sites to decrypt, so 0 may drop out; pass --threshold 2"),
    (["--keys", "threshold", "--clients", "4", "--threshold", "4", "--dropouts", "1"], None,
     "--threshold 4 needs 4 of 4 sites to decrypt, so 0 may drop out; pass --threshold 3"),
    (["--resume", "{tmp}", "--lr", "0.1"], None, "only --rounds may change"),
])
def test_bad_input_is_one_line_before_any_heavy_work(tmp_path, capsys, no_heavy_work, argv,
                                                     config, expected):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    if config is not None:
        path = tmp_path / "run.toml"
        path.write_bytes(config)
        argv += ["--config", str(path)]
    assert cli_main(["run", *argv, "--out", str(tmp_path / "out")]) == 2
    assert expected in _one_line_error(capsys)


def test_out_that_is_a_file_or_holds_a_run_is_refused_first(tmp_path, capsys, no_heavy_work):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    assert cli_main(["run", "--out", str(a_file)]) == 2
    assert "is an existing file; expected a directory" in _one_line_error(capsys)
    assert a_file.read_text() == "mine"
    for marker in ("metrics.json", "checkpoint", "adapter"):
        run = tmp_path / f"with-{marker}"
        run.mkdir()
        if marker.endswith(".json"):
            (run / marker).write_text("{}")
        else:
            (run / marker).mkdir()
        for engine in ("local", "flower"):
            assert cli_main(["run", "--engine", engine, "--out", str(run)]) == 2
            line = _one_line_error(capsys)
            assert f"--out {str(run)!r} already holds a run" in line
            assert "pass --overwrite to replace it" in line and f"--resume {run}" in line


def test_a_run_is_replaced_only_with_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli_main(["run", *SMALL, "--rounds", "2", "--algorithm", "ffa", "--out",
                     str(out)]) == 0
    before = (out / "metrics.json").read_text()
    adapter = (out / "adapter" / "adapter_model.safetensors").read_bytes()
    capsys.readouterr()
    assert cli_main(["run", *SMALL, "--rounds", "1", "--no-he", "--out", str(out)]) == 2
    assert "already holds a run (2 rounds, finished: metrics.json, checkpoint/, adapter/)" in \
        _one_line_error(capsys)
    assert (out / "metrics.json").read_text() == before  # untouched
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == adapter
    assert cli_main(["run", *SMALL, "--rounds", "1", "--no-he", "--out", str(out),
                     "--overwrite"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["rounds"]) == 1 and metrics["config"]["training"]["algorithm"] == "delta"
    ckpt = json.loads((out / "checkpoint" / "checkpoint.json").read_text())
    assert ckpt["round"] == 1 and ckpt["config"]["he"]["enabled"] is False
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() != adapter


def test_answers_too_long_for_max_len_stop_before_the_model(tmp_path, capsys, monkeypatch):
    """Every site's data is read and tokenized before the model and the keys."""
    _forbid(monkeypatch, "build_lora_model", "deal_keys")
    assert cli_main(["run", *SMALL, "--max-len", "11", "--out", str(tmp_path / "run")]) == 2
    assert "have answers too long for max_len=11; raise max_len" in _one_line_error(capsys)


def test_without_a_terminal_set_up_and_every_round_log_a_line(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="fedshield")
    assert cli_main(["run", *SMALL, "--rounds", "3", "--no-he", "--out",
                     str(tmp_path / "run")]) == 0
    messages = [r.getMessage() for r in caplog.records]
    setup = [i for i, m in enumerate(messages) if m.startswith("fedshield: set-up")]
    rounds = [i for i, m in enumerate(messages) if re.match(r"round \d/3: eval loss", m)]
    assert len(setup) == 3 and len(rounds) == 3 and max(setup) < min(rounds)
    assert any(m == "fedshield: pruning local: pruned fraction 0.20 at round 1 -> 0.50 at "
                    "round 3" for m in messages)


def test_interrupted_messages_say_what_is_saved(tmp_path):
    out = str(tmp_path)
    cmd = f"fedshield run --resume {out}"
    assert local_interrupted(out, {}, resume=cmd) == (
        "interrupted during set-up, before round 1; nothing was saved")
    started = {"started": True, "rounds": 4}
    assert local_interrupted(out, started, resume=cmd) == (
        "interrupted during round 1; no round was completed, so nothing is saved; run the "
        "same command again")
    (tmp_path / "checkpoint").mkdir()
    index = tmp_path / "checkpoint" / "checkpoint.json"
    index.write_text(json.dumps({"round": 3}))
    assert local_interrupted(out, started, resume=cmd) == (
        f"interrupted during round 4; rounds 1..3 are saved; resume with `{cmd}`")
    assert local_interrupted(out, {}, resume=cmd, resuming=True) == (
        f"interrupted during set-up; rounds 1..3 are saved; resume with `{cmd}`")
    assert local_interrupted(out, {"started": True, "rounds": 3}, resume=cmd) == (
        f"interrupted after the last round (3) while writing the adapter and plots; rounds "
        f"1..3 are saved; resume with `{cmd}` to write them")
    index.write_text(json.dumps({"round": 1}))
    assert "round 2; round 1 is saved" in local_interrupted(out, started, resume=cmd)
    assert flower_interrupted(str(tmp_path / "none")) == (
        "interrupted during set-up of the Flower run; its processes are stopped; nothing was "
        "saved")
    (tmp_path / "metrics.json").write_text(json.dumps({"rounds": [{"round": 1}, {"round": 2}]}))
    assert flower_interrupted(out) == (   # no server state: nothing to go on from
        f"interrupted during round 3 of the Flower run; its processes are stopped; rounds "
        f"1..2 are recorded in {out}/metrics.json, but no server state to resume from: run it "
        "again with --overwrite")
    (tmp_path / "server-state.json").write_text("{}")
    assert flower_interrupted(out) == (
        f"interrupted during round 3 of the Flower run; its processes are stopped; rounds "
        f"1..2 are recorded in {out}/metrics.json; resume with `fedshield run --resume {out}`")
