"""The local engine end to end: HE equals plaintext FedAvg, outputs of `fedshield run`."""

import json

import pytest
import torch

import fedshield as fs
from fedshield.cli.commands import main as cli_main
from fedshield.config import RunConfig
from fedshield.engines.local import LocalEngine

SMALL = dict(clients=2, rounds=2, examples_per_client=16, local_steps=2, batch_size=4, lora_r=4)


def _max_diff(a, b):
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


@pytest.mark.parametrize("prune", ["local", "global", "off"])
def test_encrypted_round_equals_plaintext_fedavg(tmp_path, prune):
    cfg = RunConfig.from_flat(**SMALL, prune=prune, out=str(tmp_path))
    he = LocalEngine(cfg, show_progress=False)
    plain = LocalEngine(cfg.replace(he=False), show_progress=False)
    start = {k: v.clone() for k, v in he.global_state.items()}
    for r in (1, 2):  # round 2 exercises the global mask (round 1 is unpruned by design)
        # Both start the round from the same global state (round 1's CKKS error, ~1e-9, would
        # otherwise be amplified by training and can flip a value across a local mask's cut).
        plain.set_global_state(he.global_state)
        m_he, m_plain = he.run_round(r), plain.run_round(r)
        # Same seeds, same data, same start: the clients computed identical updates; only the
        # aggregation differs (CKKS vs float64). Tolerance from the CKKS scale 2^50.
        assert _max_diff(he.global_state, plain.global_state) <= 1e-6
        assert m_he["train_loss"] == pytest.approx(m_plain["train_loss"], abs=1e-4)
    assert _max_diff(he.global_state, start) > 1e-4  # the round really moved the model
    if prune == "global":
        assert m_he["kept_fraction"] < 1.0
        assert max(m_he["bytes_up"]) < he.server.ctx.params.ring_dim * 8 * 2  # compacted


@pytest.mark.parametrize("algorithm", ["paper", "delta"])
def test_the_weight_bound_follows_the_weights(tmp_path, algorithm):
    """paper averages unweighted (each site weighs 1): its weight bound is 1, not the next
    power of two of the example counts, which at the demo's 96 examples per site made the
    first decryption refuse the round (the weights summed to 0.023 of the bound)."""
    cfg = RunConfig.from_flat(**{**SMALL, "examples_per_client": 120, "local_steps": 1},
                              algorithm=algorithm, out=str(tmp_path))
    engine = LocalEngine(cfg, show_progress=False)
    assert engine.server.weight_bound == (1.0 if algorithm == "paper" else 128.0)
    assert engine.run_round(1)["status"] == "ok"


def test_run_writes_metrics_adapter_and_plots(tmp_path):
    out = tmp_path / "run"
    rc = cli_main(["run", "--clients", "2", "--rounds", "3", "--local-steps", "4",
                   "--out", str(out), "--no-progress", "--lora-r", "4"])
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["server_has_secret_key"] is False
    assert metrics["config"]["he"]["enabled"] is True
    # the parameters the keys were made with, resolved from the run's precision request
    assert metrics["ckks_params"] == RunConfig.from_flat(clients=2).ckks_params().to_dict()
    assert metrics["config"]["data"]["clients"] == 2
    assert [s["name"] for s in metrics["sites"]] == ["site-0", "site-1"]
    assert len(metrics["rounds"]) == 3
    for i, r in enumerate(metrics["rounds"], start=1):
        assert r["round"] == i
        assert len(r["train_loss"]) == 2 and len(r["bytes_up"]) == 2
        assert set(r["seconds"]) == {"train", "prune", "encrypt", "aggregate", "decrypt"}
        assert r["bytes_down"] > 0 and 0 < r["kept_fraction"] <= 1
    assert metrics["rounds"][-1]["eval_loss"] < metrics["initial_eval_loss"]
    # the paper's 20% -> 50% schedule over this run's 3 rounds
    assert [r["prune_ratio"] for r in metrics["rounds"]] == pytest.approx([0.2, 0.35, 0.5])
    assert metrics["finished"] is True
    for name in ("loss.png", "bytes.png", "time.png"):
        assert (out / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The adapter loads with PEFT onto the saved base and reproduces the final eval loss: the
    # example-weighted mean of each site's loss on its own held-out part.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fedshield.fl.site import load_site_data
    from fedshield.training.loop import evaluate_loss

    weights = list((out / "adapter").glob("adapter_model.*"))
    assert weights and all(w.stat().st_mode & 0o777 == 0o600 for w in weights)  # model state
    base = AutoModelForCausalLM.from_pretrained(out / "base_model")
    model = PeftModel.from_pretrained(base, out / "adapter")
    tok = AutoTokenizer.from_pretrained(out / "base_model")
    cfg = RunConfig.from_dict(metrics["config"])
    total = weighted = 0.0
    for site in metrics["sites"]:
        data = load_site_data(site["data"], tokenizer=tok, cfg=cfg)
        assert data.eval_examples == site["eval_examples"]
        weighted += evaluate_loss(model, data.eval) * data.eval_examples
        total += data.eval_examples
    assert weighted / total == pytest.approx(metrics["rounds"][-1]["eval_loss"], abs=1e-4)


def test_no_he_baseline_runs(tmp_path):
    out = tmp_path / "plain"
    rc = cli_main(["run", "--no-he", "--clients", "2", "--rounds", "1", "--local-steps", "2",
                   "--out", str(out), "--no-progress", "--lora-r", "4"])
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["he"]["enabled"] is False
    assert metrics["server_has_secret_key"] is None
    n = metrics["num_lora_values"]
    assert metrics["rounds"][0]["bytes_up"] == [4 * n, 4 * n]


@pytest.mark.parametrize("bad, match", [
    (dict(clients=0), "clients=0"),
    (dict(prune="magic"), "prune='magic'"),
    (dict(lr=-1.0), "lr=-1.0"),
    (dict(lora_dropout=1.5), "lora_dropout=1.5"),
    (dict(examples_per_client=1), "examples_per_client=1"),
    (dict(eval_fraction=0.0), "eval_fraction=0.0"),
])
def test_bad_config_is_rejected_with_the_value(bad, match):
    with pytest.raises(fs.ParameterError, match=match.replace("(", r"\(")):
        RunConfig.from_flat(**bad)


def test_config_file_unknown_field(tmp_path):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"clients": 2, "colour": "blue"}))
    with pytest.raises(fs.ParameterError, match="colour"):
        RunConfig.from_file(path)
    path.write_text(json.dumps({"clients": 2, "rounds": 1}))
    assert RunConfig.from_file(path).training.rounds == 1


def test_cli_reports_bad_config_cleanly(tmp_path, capsys):
    path = tmp_path / "cfg.json"
    path.write_text("{not json")
    assert cli_main(["run", "--config", str(path), "--out", str(tmp_path)]) == 2
    assert "cannot read config" in capsys.readouterr().err


def test_global_mask_is_identical_on_every_client(tmp_path):
    """Two clients decrypting the same aggregate with their own context copies derive the same mask."""
    from fedshield.pruning import kept_fraction, l1_mask

    cfg = RunConfig.from_flat(**SMALL, prune="global", out=str(tmp_path))
    sim = LocalEngine(cfg, show_progress=False)
    before = {k: v.clone() for k, v in sim.global_state.items()}
    sim.run_round(1)
    blob = sim.sites[0].party.ctx.to_bytes(include_secret=True)
    masks = []
    for _ in range(2):
        ctx = fs.load_context(blob)  # each client holds its own copy of the shared key
        avg = fs.decrypt_update(ctx, fs.EncryptedUpdate.from_bytes(sim.last_aggregate.to_bytes()),
                                sim.layout)
        masks.append(l1_mask({k: before[k] + avg[k] for k in avg}, 0.3))
    assert all(torch.equal(masks[0][k], masks[1][k]) for k in masks[0])
    assert sim.layout.mask_fingerprint(masks[0]) == sim.layout.mask_fingerprint(masks[1])
    assert 0.6 < kept_fraction(masks[0]) < 0.8


def test_threshold_round_equals_plaintext_fedavg(tmp_path):
    cfg = RunConfig.from_flat(**SMALL, keys="threshold", out=str(tmp_path))
    th = LocalEngine(cfg, show_progress=False)
    plain = LocalEngine(cfg.replace(keys="shared", he=False), show_progress=False)
    assert th.server.ctx is None  # no dealer: the keys are set up by the protocol, round 1
    m = th.run_round(1)
    plain.run_round(1)
    assert th.server.ctx.has_secret_key is False
    assert all(not s.party.ctx.has_secret_key for s in th.sites)  # each holds a share only
    # the precision profile of threshold keys (public-key and multiparty decryption noise)
    assert th.server.ctx.params == cfg.ckks_params()
    assert not th.server.ctx.params.seeded and cfg.replace(keys="shared").ckks_params().seeded
    epochs = th.server.record.key_epochs
    assert [e.epoch for e in epochs] == [1] and epochs[0].before_round == 1
    assert _max_diff(th.global_state, plain.global_state) <= 1e-6
    assert m["decrypting_clients"] == [0, 1] and m["bytes_partial_decryptions"] > 0


def test_threshold_run_survives_a_dropout_of_the_lead(tmp_path):
    out = tmp_path / "th"
    rc = cli_main(["run", "--keys", "threshold", "--clients", "3", "--threshold", "2",
                   "--dropouts", "1", "--rounds", "2", "--local-steps", "4", "--out", str(out),
                   "--no-progress", "--lora-r", "4"])
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["server_has_secret_key"] is False
    assert metrics["ckks_params"]["seeded"] is False and metrics["ckks_params"]["flood_bits"] > 0
    assert [r["decrypting_clients"] for r in metrics["rounds"]] == [[1, 2], [1, 2]]
    assert metrics["rounds"][-1]["eval_loss"] < metrics["initial_eval_loss"]


@pytest.mark.parametrize("bad, match", [
    (dict(keys="threshold", clients=3, threshold=1), "threshold=1"),
    (dict(keys="threshold", clients=3, dropouts=1), "dropouts=1"),
    (dict(keys="threshold", clients=3, threshold=2, dropouts=2), "dropouts=2"),
    (dict(keys="threshold", he=False), "needs HE"),
    (dict(keys="threshold", clients=1), "clients=1"),
    (dict(keys="shared", dropouts=1), "dropouts=1"),
])
def test_bad_threshold_config(bad, match):
    with pytest.raises(fs.ParameterError, match=match):
        RunConfig.from_flat(**bad)


@pytest.mark.parametrize("flat, expected", [
    (dict(clients=3, dropouts=1), "dropouts=1 needs --threshold T with T <= 3 - 1: the default "
     "threshold (0) needs all 3 sites to decrypt, so 0 may drop out; pass --threshold 2 (any "
     "2 of 3 sites decrypt, so 1 may drop out)"),
    (dict(clients=5, threshold=4, dropouts=2), "--threshold 4 needs 4 of 5 sites to decrypt, "
     "so 1 may drop out; pass --threshold 3"),
    (dict(clients=4, dropouts=2), "a threshold must be more than half of the 4 sites, so at "
     "most 1 of them may ever drop out"),
    (dict(clients=2, dropouts=1), "so none may drop out"),
])
def test_dropouts_say_which_threshold_they_need(flat, expected):
    with pytest.raises(fs.ParameterError) as exc:
        RunConfig.from_flat(keys="threshold", **flat)
    assert expected in str(exc.value)


def sites_of_sizes(root, sizes, seed=0):
    """Site files of the given sizes, each in its own directory (site-a/, site-b/, ...)."""
    from fedshield.data.sites import write_site_files
    from fedshield.data.synthetic import make_synthetic_examples

    examples = make_synthetic_examples(sum(sizes), seed)
    files, at = [], 0
    for name, n in zip("abcdefgh", sizes):
        (path,) = write_site_files([examples[at:at + n]], root / f"site-{name}", prefix=name)
        files.append(path)
        at += n
    return files


def test_sites_bring_their_own_files(tmp_path):
    """--site-data once per site: each trains on its own file minus its held-out part, its
    weight is its own example count, and eval_loss is the example-weighted mean."""
    a, b = sites_of_sizes(tmp_path, [60, 120])
    out = tmp_path / "run"
    rc = cli_main(["run", "--site-data", str(a), "--site-data", str(b), "--rounds", "2",
                   "--local-steps", "6", "--lora-r", "4", "--samples", "0", "--out", str(out),
                   "--no-progress"])
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    sites = metrics["sites"]
    assert [s["name"] for s in sites] == ["a-0", "b-0"]
    assert [s["data"] for s in sites] == [str(a), str(b)]
    assert [(s["train_examples"], s["eval_examples"]) for s in sites] == [(48, 12), (96, 24)]
    assert not (out / "sites").exists()  # nothing was split: the sites' own files were read
    for r in metrics["rounds"]:
        losses = r["site_eval_loss"]
        mean = (losses[0] * 12 + losses[1] * 24) / 36
        assert r["eval_loss"] == pytest.approx(mean, rel=1e-12)
    assert metrics["rounds"][-1]["eval_loss"] < metrics["initial_eval_loss"]


def test_split_command_writes_per_site_files(tmp_path, capsys):
    from fedshield.data.files import load_instruction_data

    out = tmp_path / "split"
    assert cli_main(["split", "--sites", "3", "--how", "tasks", "--examples-per-site", "20",
                     "--out", str(out)]) == 0
    files = sorted(out.glob("site-*.jsonl"))
    assert [f.name for f in files] == ["site-0.jsonl", "site-1.jsonl", "site-2.jsonl"]
    shards = [load_instruction_data(f, "task=task") for f in files]
    assert [len(s) for s in shards] == [20, 20, 20]
    # tasks: each site mostly one task (all 12 of its task's examples: 60 over 5 tasks)
    for shard in shards:
        top = max(sum(ex["task"] == t for ex in shard) for t in {ex["task"] for ex in shard})
        assert top == 12
    assert "site-0.jsonl: 20 examples" in capsys.readouterr().out
    # the same files drive a run through the sites' own path
    rc = cli_main(["run", *sum((["--site-data", str(f)] for f in files), []), "--rounds", "1",
                   "--local-steps", "2", "--lora-r", "4", "--samples", "0",
                   "--out", str(tmp_path / "run"), "--no-progress"])
    assert rc == 0
