"""`fedshield eval` on a saved adapter and `fedshield report` over several runs."""

import json

import pytest

from fedshield.cli import main as cli_main
from fedshield.config import RunConfig
from fedshield.data.files import load_instruction_data
from fedshield.data.sites import holdout
from fedshield.local_engine import LocalEngine

SMALL = dict(clients=2, rounds=2, examples_per_client=16, local_steps=3,
             batch_size=4, lora_r=4, samples=1, sample_tokens=4)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for name, changes in (("he", {}), ("plain", {"he": False}),
                          ("dp", {"he": False, "dp_clip": 1.0, "dp_noise": 0.8})):
        cfg = RunConfig.from_flat(**SMALL, **changes, out=str(root / name))
        out[name] = (root / name, LocalEngine(cfg, show_progress=False).run())
    return out


def _held_out_file(path, run_dir, site: int = 0):
    """Site ``site``'s held-out part of the run in ``run_dir``, as a file of its own."""
    cfg = RunConfig.from_dict(json.loads((run_dir / "metrics.json").read_text())["config"])
    examples = load_instruction_data(run_dir / "sites" / f"site-{site}.jsonl")
    _, held = holdout(examples, cfg.data.eval_fraction, cfg.training.seed)
    path.write_text("\n".join(json.dumps({k: ex[k] for k in ("instruction", "input", "output")})
                              for ex in held))
    return path


def test_eval_reproduces_the_runs_final_loss(runs, tmp_path, capsys):
    run_dir, metrics = runs["he"]
    data = _held_out_file(tmp_path / "held_out.jsonl", run_dir)
    result_path = tmp_path / "eval.json"
    rc = cli_main(["eval", "--adapter", str(run_dir / "adapter"), "--data", str(data),
                   "--samples", "2", "--sample-tokens", "3", "--json", str(result_path)])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    result = json.loads(result_path.read_text())
    assert printed == result
    assert result["examples"] == metrics["sites"][0]["eval_examples"] == 3
    assert result["template"] == "compact"
    site_loss = metrics["rounds"][-1]["site_eval_loss"][0]
    assert result["eval_loss"] == pytest.approx(site_loss, abs=1e-5)
    assert result["perplexity"] == pytest.approx(2.718281828459045 ** site_loss, rel=1e-4)
    assert len(result["samples"]) == 2 and all(len(s["generated"]) <= 3 for s in result["samples"])


def test_eval_rejects_bad_paths(runs, tmp_path, capsys):
    run_dir, _ = runs["he"]
    data = _held_out_file(tmp_path / "held_out.jsonl", run_dir)
    assert cli_main(["eval", "--adapter", str(tmp_path), "--data", str(data)]) == 2
    assert "no adapter_config.json" in capsys.readouterr().err
    assert cli_main(["eval", "--adapter", str(run_dir / "adapter"), "--model",
                     str(tmp_path / "missing"), "--data", str(data)]) == 2
    assert "not a local directory" in capsys.readouterr().err
    assert cli_main(["eval", "--adapter", str(run_dir / "adapter"),
                     "--data", str(tmp_path / "none.jsonl")]) == 2
    assert "none.jsonl" in capsys.readouterr().err


def test_report_draws_runs_side_by_side(runs, tmp_path, capsys):
    dirs = [str(runs[name][0]) for name in ("he", "plain", "dp")]
    rc = cli_main(["report", *dirs, "--out", str(tmp_path / "report")])
    assert rc == 0
    table = (tmp_path / "report" / "report.md").read_text()
    assert (tmp_path / "report" / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [line for line in table.splitlines()[2:] if line.startswith("|")]
    assert len(rows) == 3
    assert "HE shared" in rows[0] and "plaintext" in rows[1] and "DP sigma=0.8" in rows[2]
    final = runs["he"][1]["rounds"][-1]["eval_loss"]
    assert f"{final:.4f}" in rows[0]
    assert f"{runs['dp'][1]['dp']['epsilon']:.2f}" in rows[2]
    assert table in capsys.readouterr().out


def test_report_rejects_a_directory_without_metrics(tmp_path, capsys):
    assert cli_main(["report", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    assert "metrics.json" in capsys.readouterr().err
