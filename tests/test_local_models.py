"""`--model PATH` and `--data PATH`: tiny local Llama, Mistral, Qwen2 and GPT-2 checkpoints
built from configs, trained for one federated round on the project's tiny fixtures."""

import json
from pathlib import Path

import pytest
import torch

import fedshield as fs
from fedshield.data import tokenize
from fedshield.cli.commands import main as cli_main
from fedshield.config import RunConfig
from fedshield.training.base_model import load_local_model, load_local_tokenizer, seeded_rng
from fedshield.engines.local import LocalEngine

FIXTURES = Path(__file__).parent / "fixtures"
FLASHCARDS = FIXTURES / "medical_meadow_flashcards.jsonl"
SMALL = dict(clients=2, rounds=1, local_steps=2, batch_size=4, lora_r=4, max_len=128, he=False,
             data=str(FLASHCARDS))


def _config(arch: str, vocab: int):
    from transformers import GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

    ids = dict(vocab_size=vocab, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if arch == "gpt2":
        return GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=256, **ids)
    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[arch]
    return cls(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
               **ids)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """arch -> a saved tiny checkpoint with the char-level tokenizer."""
    from transformers import AutoModelForCausalLM

    tok = tokenize.build_tokenizer()
    dirs = {}
    for arch in ("llama", "mistral", "qwen2", "gpt2"):
        path = tmp_path_factory.mktemp(arch)
        with seeded_rng(0):
            model = AutoModelForCausalLM.from_config(_config(arch, len(tok)))
        model.save_pretrained(path)
        tok.save_pretrained(path)
        dirs[arch] = path
    return dirs


@pytest.mark.parametrize("arch, targets", [("llama", {"q_proj", "v_proj"}),
                                           ("mistral", {"q_proj", "v_proj"}),
                                           ("qwen2", {"q_proj", "v_proj"}),
                                           ("gpt2", {"c_attn"})])
def test_one_round_on_a_local_model_and_file(tmp_path, model_dirs, arch, targets):
    out = tmp_path / "run"
    cfg = RunConfig.from_flat(**SMALL, model=str(model_dirs[arch]), out=str(out))
    sim = LocalEngine(cfg, show_progress=False)
    modules = {name.split(".")[-3] for name in sim.global_state}
    assert modules == targets
    # 12 flashcards split IID: 6 per site, each holding out floor(0.2 * 6) = 1
    assert [s.data.train_examples for s in sim.sites] == [5, 5]
    assert [s.data.eval_examples for s in sim.sites] == [1, 1]
    # 128 tokens do not hold the longest prompts
    assert sum(s.data.stats["truncated"] for s in sim.sites) > 0
    metrics = sim.run()
    assert len(metrics["rounds"]) == 1 and metrics["rounds"][0]["eval_loss"] > 0

    # The adapter references the local base by path and reproduces the final eval loss.
    adapter_cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == str(model_dirs[arch].resolve())
    assert set(adapter_cfg["target_modules"]) == targets
    assert not (out / "base_model").exists()
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fedshield.training.loop import evaluate_loss

    base = AutoModelForCausalLM.from_pretrained(adapter_cfg["base_model_name_or_path"])
    model = PeftModel.from_pretrained(base, out / "adapter")
    losses = [evaluate_loss(model, s.data.eval) for s in sim.sites]
    assert losses == pytest.approx(metrics["rounds"][-1]["site_eval_loss"], abs=1e-4)


def test_encrypted_round_on_a_local_model_equals_plaintext(tmp_path, model_dirs):
    cfg = RunConfig.from_flat(**{**SMALL, "he": True}, model=str(model_dirs["qwen2"]), out=str(tmp_path),
                    split="dirichlet", dirichlet_alpha=5.0)  # 8 + 4 examples
    he = LocalEngine(cfg, show_progress=False)
    plain = LocalEngine(cfg.replace(he=False), show_progress=False)
    start = {k: v.clone() for k, v in he.global_state.items()}
    m = he.run_round(1)   # sets up the keys first (each site makes its own)
    assert he.server.ctx is not None and not he.server.ctx.has_secret_key
    assert max(m["bytes_up"]) > 4 * he.layout.numel  # ciphertexts, not plaintext floats
    assert max((he.global_state[k] - start[k]).abs().max().item() for k in start) > 1e-4
    plain.run_round(1)
    diff = max((he.global_state[k] - plain.global_state[k]).abs().max().item()
               for k in he.global_state)
    assert diff <= 1e-6


def test_cli_with_model_data_columns_and_targets(tmp_path, model_dirs):
    out = tmp_path / "cli"
    rc = cli_main(["run", "--model", str(model_dirs["llama"]),
                   "--data", str(FIXTURES / "math_instruct.jsonl"), "--columns", "task=source",
                   "--split", "tasks", "--lora-targets", "q_proj,k_proj,v_proj",
                   "--clients", "2", "--rounds", "1", "--eval-fraction", "0.3",
                   "--local-steps", "1", "--batch-size", "4", "--lora-r", "2",
                   "--lora-alpha", "4", "--max-len", "128", "--no-he", "--no-progress",
                   "--out", str(out)])
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["lora"]["targets"] == "q_proj,k_proj,v_proj"
    # 12 examples, 6 per site, each holding out floor(0.3 * 6) = 1
    assert [s["train_examples"] for s in metrics["sites"]] == [5, 5]
    adapter_cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert set(adapter_cfg["target_modules"]) == {"q_proj", "k_proj", "v_proj"}
    assert adapter_cfg["r"] == 2 and adapter_cfg["lora_alpha"] == 4


def test_bf16_base(tmp_path, model_dirs):
    cfg = RunConfig.from_flat(**SMALL, model=str(model_dirs["mistral"]), out=str(tmp_path), dtype="bf16")
    sim = LocalEngine(cfg, show_progress=False)
    model = sim.sites[0].party.model
    assert model.get_base_model().model.embed_tokens.weight.dtype == torch.bfloat16
    before = {k: v.clone() for k, v in sim.global_state.items()}
    entry = sim.run_round(1)
    assert all(v.dtype == torch.float32 for v in sim.global_state.values())
    assert max((sim.global_state[k] - before[k]).abs().max().item() for k in before) > 0
    assert entry["eval_loss"] > 0


@pytest.mark.parametrize("changes, error, match", [
    (dict(lora_targets="nope_proj"), fs.ParameterError, "nope_proj"),
    (dict(max_len=512), fs.ParameterError, "max_len=512.*256 positions"),
    (dict(split="tasks"), fs.DataError, "needs a task field"),
    (dict(clients=12), fs.DataError, "at least one to train on and one to hold out"),
    (dict(data="/nowhere.jsonl"), fs.DataError, "/nowhere.jsonl: no such file"),
])
def test_bad_local_runs_stop_clearly(tmp_path, model_dirs, changes, error, match):
    cfg = RunConfig.from_flat(**{**SMALL, **changes}, model=str(model_dirs["llama"]), out=str(tmp_path))
    with pytest.raises(error, match=match):
        LocalEngine(cfg, show_progress=False)


def test_model_directory_errors(tmp_path):
    with pytest.raises(fs.ParameterError, match="not 'tiny' and not a local directory"):
        load_local_model(tmp_path / "missing")
    with pytest.raises(fs.ParameterError, match="no config.json"):
        load_local_tokenizer(tmp_path)
    cfg = RunConfig.from_flat(**SMALL, model=str(tmp_path / "missing"), out=str(tmp_path))
    with pytest.raises(fs.ParameterError, match="missing"):
        LocalEngine(cfg, show_progress=False)


def test_tokenizer_without_pad_gets_eos(tmp_path, model_dirs):
    import shutil

    path = tmp_path / "nopad"
    shutil.copytree(model_dirs["gpt2"], path)
    tok = load_local_tokenizer(path)
    tok.pad_token = None
    tok.save_pretrained(path)
    tok = load_local_tokenizer(path)
    assert tok.pad_token_id == tok.eos_token_id == 2


def test_tiny_model_with_file_data_and_dirichlet(tmp_path):
    cfg = RunConfig.from_flat(**{**SMALL, "clients": 3, "max_len": 200,
                       "data": str(FIXTURES / "fingpt_sentiment.csv")},
                    out=str(tmp_path), split="dirichlet", dirichlet_alpha=0.5)
    sim = LocalEngine(cfg, show_progress=False)
    sizes = [(s.data.train_examples, s.data.eval_examples) for s in sim.sites]
    assert sum(t + e for t, e in sizes) == 12 and min(min(t, e) for t, e in sizes) >= 1
    assert all(s.data.stats == {"truncated": 0, "skipped": 0, "eval_truncated": 0,
                                "eval_skipped": 0} for s in sim.sites)
    sim.run_round(1)


@pytest.mark.parametrize("bad, match", [
    (dict(split="random"), "split='random'"),
    (dict(dtype="fp16"), "dtype='fp16'"),
    (dict(dirichlet_alpha=0.0), "dirichlet_alpha=0.0"),
    (dict(columns="instruction"), "FIELD=COLUMN"),
    (dict(columns="output=answer"), "applies to a --data file only"),
    (dict(lora_targets="q_proj,,v_proj"), "empty module name"),
])
def test_new_config_fields_are_validated(bad, match):
    with pytest.raises(fs.ParameterError, match=match):
        RunConfig.from_flat(**bad)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_saved_tokenizer_loads_as_saved(model_dirs, arch):
    """transformers 5's AutoTokenizer would rebuild a generic tokenizer.json as Qwen2's class."""
    text = "### Response:\nab\tc"
    ref = tokenize.build_tokenizer()(text)["input_ids"]
    assert load_local_tokenizer(model_dirs[arch])(text)["input_ids"] == ref
