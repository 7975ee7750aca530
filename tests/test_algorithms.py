"""--algorithm ffa (FFA-LoRA) next to delta and paper; model options: gradient checkpointing,
device placement, 8/4-bit loading errors; prompt templates; per-round samples."""

from pathlib import Path

import pytest
import torch

import fedshield as fs
from fedshield.config import RunConfig
from fedshield.training.base_model import load_local_model, resolve_device
from fedshield.engines.local import LocalEngine

SMALL = dict(clients=2, rounds=2, examples_per_client=16, local_steps=3,
             batch_size=4, lora_r=4, samples=0, prune="off")


def test_ffa_freezes_a_and_aggregates_b_only(tmp_path):
    cfg = RunConfig.from_flat(**SMALL, algorithm="ffa", he=False, out=str(tmp_path))
    sim = LocalEngine(cfg, show_progress=False)
    delta = LocalEngine(cfg.replace(algorithm="delta"), show_progress=False)
    assert sim.layout.numel * 2 == delta.layout.numel  # q/v: A and B have equal sizes
    shared = sim.sites[0].party.shared_names
    assert all("lora_B" in k for k in shared)
    start = {k: v.clone() for k, v in sim.global_state.items()}
    plan = sim.server.plan(1)
    replies = [r for _, r in [(s.party_id, s.train_round(plan)) for s in sim.sites]]
    assert all(set(r.values) == set(shared) for r in replies)
    average = sim.server.aggregate(plan, sim.server.screen_updates(
        plan, [(r.party, r) for r in replies]))
    for site in sim.sites:
        site.apply(plan, average=average)
    for k, v in sim.global_state.items():
        if "lora_A" in k:
            assert torch.equal(v, start[k])  # frozen at the shared seeded init
        else:
            assert not torch.equal(v, start[k])
    # Exact aggregation: the global product B A is the weighted average of the clients' B_i A.
    w = [r.weight for r in replies]
    for kb in shared:
        ka = kb.replace("lora_B", "lora_A")
        a = start[ka].double()
        clients = [(start[kb].double() + torch.from_numpy(r.values[kb]).double()) @ a
                   for r in replies]
        expected = sum(wi * p for wi, p in zip(w, clients)) / sum(w)
        assert torch.allclose(sim.global_state[kb].double() @ a, expected, atol=1e-7)


def test_ffa_encrypted_equals_plaintext_and_sends_less(tmp_path):
    cfg = RunConfig.from_flat(**{**SMALL, "lora_r": 32}, algorithm="ffa", out=str(tmp_path))
    he = LocalEngine(cfg, show_progress=False)
    plain = LocalEngine(cfg.replace(he=False), show_progress=False)
    m_he = he.run_round(1)
    plain.run_round(1)
    diff = max(float((he.global_state[k] - plain.global_state[k]).abs().max())
               for k in he.global_state)
    assert diff <= 1e-6
    full = LocalEngine(cfg.replace(algorithm="delta"), show_progress=False)
    m_full = full.run_round(1)
    assert max(m_he["bytes_up"]) < max(m_full["bytes_up"])


def test_samples_are_generated_every_round(tmp_path):
    cfg = RunConfig.from_flat(**{**SMALL, "samples": 2, "rounds": 1}, sample_tokens=5, he=False,
                    out=str(tmp_path))
    entry = LocalEngine(cfg, show_progress=False).run_round(1)
    assert len(entry["samples"]) == 2
    for s in entry["samples"]:
        assert set(s) == {"instruction", "input", "reference", "generated"}
        assert isinstance(s["generated"], str) and len(s["generated"]) <= 5
    assert entry["perplexity"] == pytest.approx(2.718281828 ** entry["eval_loss"], rel=1e-6)


def test_gradient_checkpointing_trains_the_same_model(tmp_path):
    cfg = RunConfig.from_flat(**{**SMALL, "rounds": 1}, lora_dropout=0.0, he=False, out=str(tmp_path))
    plain = LocalEngine(cfg, show_progress=False)
    ckpt = LocalEngine(cfg.replace(grad_checkpointing=True), show_progress=False)
    assert ckpt.sites[0].party.model.base_model.model.is_gradient_checkpointing
    assert not plain.sites[0].party.model.base_model.model.is_gradient_checkpointing
    m_plain, m_ckpt = plain.run_round(1), ckpt.run_round(1)
    assert m_ckpt["train_loss"] == pytest.approx(m_plain["train_loss"], abs=1e-5)
    diff = max(float((ckpt.global_state[k] - plain.global_state[k]).abs().max())
               for k in plain.global_state)
    assert diff < 1e-5


def test_template_choice_changes_the_prompts(tmp_path):
    compact = LocalEngine(RunConfig.from_flat(**SMALL, he=False, out=str(tmp_path)),
                          show_progress=False)
    alpaca = LocalEngine(RunConfig.from_flat(**SMALL, he=False, template="alpaca", max_len=256,
                                             out=str(tmp_path)), show_progress=False)
    assert compact.cfg.model.compact_template and not alpaca.cfg.model.compact_template
    n_compact = int(compact.sites[0].data.eval["attention_mask"].sum())
    n_alpaca = int(alpaca.sites[0].data.eval["attention_mask"].sum())
    assert n_alpaca > n_compact  # the preamble sentence is there


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU errors")
def test_gpu_only_options_stop_with_a_clear_error(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    with pytest.raises(fs.UnsupportedPlatform, match="no CUDA GPU"):
        resolve_device("cuda")
    assert resolve_device("auto") == torch.device("cpu")
    LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                                 num_hidden_layers=1, num_attention_heads=2)).save_pretrained(tmp_path)
    for mode in ("8bit", "4bit"):
        with pytest.raises(fs.UnsupportedPlatform, match=f"quantize='{mode}' needs"):
            load_local_model(tmp_path, quantize=mode)
    with pytest.raises(fs.ParameterError, match="quantize"):
        load_local_model(tmp_path, quantize="2bit")


@pytest.mark.parametrize("changes, match", [
    (dict(quantize="4bit"), "tiny demo model"),
    (dict(quantize="8bit", model="/some/dir", device="cpu"), "needs a CUDA GPU"),
    (dict(device="tpu"), "device"),
    (dict(algorithm="fedprox"), "algorithm"),
    (dict(samples=-1), "samples"),
    (dict(template="chatml"), "template"),
])
def test_config_rejects_bad_model_options(changes, match):
    with pytest.raises(fs.ParameterError, match=match):
        RunConfig.from_flat(**changes)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_round_trains_on_the_gpu(tmp_path):
    cfg = RunConfig.from_flat(**{**SMALL, "rounds": 1}, lora_dropout=0.0, he=False, device="cuda",
                    out=str(tmp_path))
    gpu = LocalEngine(cfg, show_progress=False)
    assert all(p.device.type == "cuda" for p in gpu.sites[0].party.model.parameters())
    cpu = LocalEngine(cfg.replace(device="cpu"), show_progress=False)
    m_gpu, m_cpu = gpu.run_round(1), cpu.run_round(1)
    assert all(v.device.type == "cpu" for v in gpu.global_state.values())  # what gets encrypted
    assert m_gpu["eval_loss"] == pytest.approx(m_cpu["eval_loss"], abs=1e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", ["8bit", "4bit"])
def test_quantized_loading_trains_lora_on_the_gpu(tmp_path, mode):
    pytest.importorskip("bitsandbytes")
    from fedshield.data import tokenize
    from fedshield.training.base_model import build_tiny_llama
    base = tmp_path / "base"
    tok = tokenize.build_tokenizer()
    build_tiny_llama(len(tok), hidden_size=128, intermediate=256).save_pretrained(base)
    tok.save_pretrained(base)
    flashcards = Path(__file__).parent / "fixtures" / "medical_meadow_flashcards.jsonl"
    cfg = RunConfig.from_flat(clients=2, rounds=1, local_steps=2, batch_size=4, lora_r=4,
                              max_len=128, he=False, samples=0, model=str(base),
                              data=str(flashcards), quantize=mode, out=str(tmp_path / "run"))
    sim = LocalEngine(cfg, show_progress=False)
    start = {k: v.clone() for k, v in sim.global_state.items()}
    sim.run_round(1)
    assert any(not torch.equal(sim.global_state[k], start[k]) for k in start)
