"""`fedshield eval` on a saved adapter and `fedshield report` over several runs."""

import json

import pytest

from fedshield.cli.commands import main as cli_main
from fedshield.config import RunConfig
from fedshield.data.files import load_instruction_data
from fedshield.data.sites import holdout
from fedshield.engines.local import LocalEngine

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


def _broken_copy(run_dir, dest, damage):
    import shutil

    shutil.copytree(run_dir / "adapter", dest)
    damage(dest)
    return dest


def _truncate(adapter):
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])


@pytest.mark.parametrize("damage, message", [
    (_truncate, "adapter_model.safetensors is damaged or truncated"),
    (lambda a: (a / "adapter_model.safetensors").unlink(),
     "the adapter's weights are missing (no adapter_model.safetensors or adapter_model.bin"),
    (lambda a: (a / "fedshield_adapter.json").unlink(),
     "has no fedshield_adapter.json (which `fedshield run` writes beside the adapter: the "
     "template and max_len it trained with); give --template alpaca|compact and --max-len N"),
    (lambda a: (a / "fedshield_adapter.json").write_text("[1]"),
     "fedshield_adapter.json holds a list, not an object"),
    (lambda a: (a / "adapter_config.json").write_text("{not json"),
     "adapter_config.json is not JSON"),
], ids=["truncated", "no-weights", "no-meta", "bad-meta", "bad-config"])
def test_eval_on_a_broken_adapter_is_one_line(runs, tmp_path, capsys, monkeypatch, damage,
                                              message):
    import fedshield.training.evaluation as evaluation

    def no_model(*args, **kwargs):
        raise AssertionError("the model loaded before the broken adapter was refused")

    monkeypatch.setattr(evaluation, "load_local_model", no_model)
    run_dir, _ = runs["he"]
    adapter = _broken_copy(run_dir, tmp_path / "adapter", damage)
    data = _held_out_file(tmp_path / "held_out.jsonl", run_dir)
    assert cli_main(["eval", "--adapter", str(adapter), "--data", str(data)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedshield: error: --adapter"), lines
    assert message in lines[0]


def test_eval_without_the_note_runs_with_template_and_max_len_given(runs, tmp_path, capsys):
    run_dir, metrics = runs["he"]
    adapter = _broken_copy(run_dir, tmp_path / "adapter",
                           lambda a: (a / "fedshield_adapter.json").unlink())
    data = _held_out_file(tmp_path / "held_out.jsonl", run_dir)
    max_len = metrics["config"]["data"]["max_len"]
    assert cli_main(["eval", "--adapter", str(adapter), "--data", str(data), "--template",
                     "compact", "--max-len", str(max_len), "--samples", "0"]) == 0
    result = json.loads(capsys.readouterr().out)
    site_loss = metrics["rounds"][-1]["site_eval_loss"][0]
    assert result["eval_loss"] == pytest.approx(site_loss, abs=1e-5)


@pytest.mark.parametrize("argv, message", [
    (["--max-len", "5"], "--max-len=5 is too short"),
    (["--samples", "-1"], "--samples -1 must be an int >= 0"),
    (["--json", "{tmp}/missing/out.json"], "the directory"),
])
def test_eval_rejects_bad_settings_first(runs, tmp_path, capsys, argv, message):
    run_dir, _ = runs["he"]
    data = _held_out_file(tmp_path / "held_out.jsonl", run_dir)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert cli_main(["eval", "--adapter", str(run_dir / "adapter"), "--data", str(data),
                     *argv]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines


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


def test_report_shows_a_dash_where_the_sites_withheld_their_losses(runs, tmp_path, capsys):
    """Sites whose metrics policy is `none` send no loss: the run's record has None where a
    loss would be, and the report says "-" there instead of failing."""
    metrics = json.loads((runs["he"][0] / "metrics.json").read_text())
    metrics["initial_eval_loss"] = None
    for entry in metrics["rounds"]:
        entry.update(eval_loss=None, perplexity=None)
    withheld = tmp_path / "withheld"
    withheld.mkdir()
    (withheld / "metrics.json").write_text(json.dumps(metrics))
    assert cli_main(["report", str(withheld), "--out", str(tmp_path / "report")]) == 0
    row = (tmp_path / "report" / "report.md").read_text().splitlines()[2]
    assert "| - -> - | - |" in row
