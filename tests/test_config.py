"""The run config in sections: validation, TOML/JSON files, flat configs of earlier versions,
and a CLI generated from it (every field has exactly one flag)."""

from __future__ import annotations

import argparse
import json
from dataclasses import fields

import pytest

import fedshield as fs
from fedshield.cli.commands import build_parser
from fedshield.config import RETIRED, SECTIONS, RunConfig, options


def _run_args(argv):
    return build_parser().parse_args(["run", *argv])


def test_every_field_has_one_flag_and_the_cli_has_them_all():
    opts = list(options())
    assert len(opts) == sum(len(fields(cls)) for cls in SECTIONS.values())
    flags = [o.flag for o in opts]
    assert len(set(flags)) == len(flags), "two settings share a flag"
    args = vars(_run_args([]))
    assert set(flags) <= set(args)
    assert all(args[f] is None for f in flags)  # nothing given: the config's own defaults
    # every flag of the CLI contract, and the ones a hand-kept list once missed
    for flag in ("clients", "rounds", "model", "data", "he", "keys", "prune", "algorithm",
                 "engine", "site_data", "out", "ring_dim", "scale_bits", "prune_p0",
                 "prune_target", "prune_t_start", "prune_t_end", "eval_fraction"):
        assert flag in flags, flag


def test_flags_reach_their_section_fields():
    argv = ["--lora-r", "8", "--no-he", "--site-data", "a.jsonl", "--site-data", "b.jsonl",
            "--prune-t-end", "7", "--ring-dim", "8192", "--grad-checkpointing"]
    args = _run_args(argv)
    changes = {o.flag: getattr(args, o.flag) for o in options()
               if getattr(args, o.flag) is not None}
    cfg = RunConfig().replace(**changes)
    assert cfg.lora.r == 8 and cfg.he.enabled is False and cfg.pruning.t_end == 7
    assert cfg.data.site_data == ("a.jsonl", "b.jsonl") and cfg.n_sites == 2
    assert cfg.he.ring_dim == 8192 and cfg.model.grad_checkpointing is True


def test_toml_and_json_sections(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('[training]\nrounds = 2\nlr = 0.005\n[keys]\nmode = "threshold"\n'
                    '[data]\nsite_data = ["x.jsonl", "y.jsonl", "z.jsonl"]\n')
    cfg = RunConfig.from_file(toml)
    assert (cfg.training.rounds, cfg.training.lr, cfg.keys.mode) == (2, 0.005, "threshold")
    assert cfg.n_sites == 3
    as_json = tmp_path / "run.json"
    as_json.write_text(json.dumps(cfg.to_dict()))
    assert RunConfig.from_file(as_json) == cfg


def test_flat_json_of_earlier_versions_loads(tmp_path):
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"clients": 2, "rounds": 3, "lora_r": 8, "he": False,
                                "prune_t_end": 5, "dp_clip": 1.0, "dp_noise": 0.5}))
    cfg = RunConfig.from_file(path)
    assert (cfg.data.clients, cfg.training.rounds, cfg.lora.r) == (2, 3, 8)
    assert cfg.he.enabled is False and cfg.pruning.t_end == 5 and cfg.dp.enabled


def test_a_retired_flat_key_says_how_to_convert(tmp_path):
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"clients": 2, "eval_examples": 16}))
    with pytest.raises(fs.ParameterError, match="eval_fraction"):
        RunConfig.from_file(path)
    assert set(RETIRED) == {"eval_examples"}


@pytest.mark.parametrize("content, match", [
    ('{"training": {"rounds": 0}}', "rounds=0"),
    ('{"training": {"colour": 1}}', "unknown fields \\['colour'\\] in section 'training'"),
    ('{"trianing": {"rounds": 1}}', "unknown sections \\['trianing'\\]"),
    ('{"training": 3, "lora": {}}', "section 'training' must be a table"),
    ('[1, 2]', "must hold an object"),
])
def test_bad_config_files_name_the_problem(tmp_path, content, match):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(fs.ParameterError, match=match):
        RunConfig.from_file(path)


def test_bad_toml_and_binary_files(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[training\nrounds = 2")
    with pytest.raises(fs.ParameterError, match="not valid TOML"):
        RunConfig.from_file(path)
    path = tmp_path / "bin.json"
    path.write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(fs.ParameterError, match="not UTF-8"):
        RunConfig.from_file(path)


@pytest.mark.parametrize("flat, match", [
    (dict(site_data=["a.jsonl", "a.jsonl"]), "names a file twice"),
    (dict(site_data=["a.jsonl"], data="b.jsonl"), "not both"),
    (dict(site_data=["a.jsonl"], keys="threshold"), "clients=1"),
    (dict(site_data=["a.jsonl", "b.jsonl"], min_clients=3), "min_clients=3"),
    (dict(eval_fraction=0.95), "eval_fraction=0.95"),
    (dict(flood_bits=20, he=False), "needs HE"),
])
def test_cross_section_checks(flat, match):
    with pytest.raises(fs.ParameterError, match=match):
        RunConfig.from_flat(**flat)


def test_sections_are_frozen_and_validated_alone():
    cfg = RunConfig()
    with pytest.raises(Exception):
        cfg.training.rounds = 3
    with pytest.raises(fs.ParameterError, match="lora_dropout=1.5"):
        SECTIONS["lora"](dropout=1.5)
    with pytest.raises(fs.ParameterError, match="must be a TrainingConfig"):
        RunConfig(training={"rounds": 2})
