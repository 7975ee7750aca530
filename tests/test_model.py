"""Tests for fedshield.training.base_model and .lora: tiny Llama, LoRA settings, LoRA state
exchange."""

import dataclasses

import pytest
import torch

import fedshield as fs

from fedshield.config import LoraConfig
from fedshield.training import base_model, lora

VOCAB = 101


def _lora(seed=0, r=8, model_seed=0, **kw):
    return lora.attach_lora(
        base_model.build_tiny_llama(VOCAB, seed=model_seed), LoraConfig(r=r, alpha=2 * r, **kw), seed=seed
    )


def _ids(n=2, length=12):
    return torch.arange(n * length).reshape(n, length) % VOCAB


# ---------------------------------------------------------------- base model


def test_build_tiny_llama_config_and_size():
    m = base_model.build_tiny_llama(VOCAB)
    c = m.config
    assert (c.vocab_size, c.hidden_size, c.num_hidden_layers, c.num_attention_heads) == (VOCAB, 64, 2, 4)
    assert (c.intermediate_size, c.max_position_embeddings) == (128, 256)
    assert (c.pad_token_id, c.bos_token_id, c.eos_token_id) == (0, 1, 2)
    assert all(p.dtype == torch.float32 for p in m.parameters())
    assert sum(p.numel() for p in m.parameters()) < 500_000
    assert m(input_ids=_ids()).logits.shape == (2, 12, VOCAB)


def test_build_tiny_llama_deterministic_per_seed():
    a = base_model.build_tiny_llama(VOCAB, seed=7).state_dict()
    b = base_model.build_tiny_llama(VOCAB, seed=7).state_dict()
    c = base_model.build_tiny_llama(VOCAB, seed=8).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["lm_head.weight"], c["lm_head.weight"])


def test_build_tiny_llama_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    base_model.build_tiny_llama(VOCAB, seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_build_tiny_llama_init_std_scales_weights():
    small = base_model.build_tiny_llama(VOCAB, init_std=0.02).lm_head.weight.detach().std()
    big = base_model.build_tiny_llama(VOCAB, init_std=0.1).lm_head.weight.detach().std()
    assert abs(float(small) - 0.02) < 0.003 and abs(float(big) - 0.1) < 0.01


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(vocab_size=0), "vocab_size must be >= 1, got 0"),
        (dict(vocab_size=VOCAB, layers=0), "layers must be >= 1, got 0"),
        (dict(vocab_size=VOCAB, hidden_size=66, heads=4), "hidden_size=66 is not divisible by heads=4"),
        (dict(vocab_size=VOCAB, eos_token_id=VOCAB), f"eos_token_id={VOCAB} is outside the vocab"),
        (dict(vocab_size=VOCAB, init_std=0.0), "init_std must be > 0, got 0.0"),
    ],
)
def test_build_tiny_llama_bad_inputs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        base_model.build_tiny_llama(**kwargs)


# ---------------------------------------------------------------- LoRA settings


def test_attach_lora_takes_the_run_config_lora_section():
    """One definition of the LoRA settings: config.LoraConfig (the paper's defaults), whose
    targets override the architecture's defaults."""
    assert LoraConfig() == LoraConfig(r=32, alpha=64.0, dropout=0.05, targets="")
    default = lora.attach_lora(base_model.build_tiny_llama(VOCAB), LoraConfig(r=4, alpha=8))
    assert {n.split(".")[-3] for n in lora.get_lora_state(default)} == {"q_proj", "v_proj"}
    only_q = lora.attach_lora(base_model.build_tiny_llama(VOCAB),
                              LoraConfig(r=4, alpha=8, targets="q_proj"))
    assert {n.split(".")[-3] for n in lora.get_lora_state(only_q)} == {"q_proj"}


# ---------------------------------------------------------------- attach_lora


def test_attach_lora_trainable_params_and_identity_at_init():
    from peft import PeftModel

    base = base_model.build_tiny_llama(VOCAB)
    with torch.no_grad():
        ref = base(input_ids=_ids()).logits.clone()
    pm = lora.attach_lora(base, LoraConfig(r=8, alpha=16))
    assert isinstance(pm, PeftModel)
    assert pm.peft_config["default"].task_type == "CAUSAL_LM"
    trainable = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert len(trainable) == 2 * 2 * 2  # layers x {q,v} x {A,B}
    pm.eval()
    with torch.no_grad():  # B is zero-initialised, so the adapter starts as a no-op
        assert torch.allclose(pm(input_ids=_ids()).logits, ref, atol=1e-6)


def test_attach_lora_deterministic_per_seed_and_rng_untouched():
    torch.manual_seed(42)
    expected = torch.rand(2)
    torch.manual_seed(42)
    a = lora.get_lora_state(_lora(seed=1))
    assert torch.equal(torch.rand(2), expected)
    b = lora.get_lora_state(_lora(seed=1))
    c = lora.get_lora_state(_lora(seed=2))
    assert all(torch.equal(a[k], b[k]) for k in a)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    assert not torch.equal(a[key], c[key])


def test_attach_lora_rejects_non_settings():
    with pytest.raises(fs.ParameterError, match="lora must be a fedshield LoraConfig, got dict"):
        lora.attach_lora(base_model.build_tiny_llama(VOCAB), {"r": 8})


# ---------------------------------------------------------------- LoRA state


def test_get_lora_state_names_shapes_dtype():
    r = 8
    state = lora.get_lora_state(_lora(r=r))
    expected = {
        f"base_model.model.model.layers.{i}.self_attn.{m}.lora_{ab}.weight"
        for i in range(2)
        for m in ("q_proj", "v_proj")
        for ab in ("A", "B")
    }
    assert set(state) == expected
    for name, t in state.items():
        assert t.dtype == torch.float32 and t.device.type == "cpu"
        if ".lora_A." in name:
            assert t.shape == (r, 64)  # (r, in_features)
        else:
            assert t.shape == (64, r)  # (out_features, r)
            assert not t.any()  # B starts at zero


def test_get_lora_state_is_a_snapshot_not_a_view():
    pm = _lora()
    state = lora.get_lora_state(pm)
    before = {k: v.clone() for k, v in state.items()}
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.add_(1.0)
    assert all(torch.equal(state[k], before[k]) for k in state)
    assert not any(torch.equal(lora.get_lora_state(pm)[k], before[k]) for k in state)


def test_set_lora_state_round_trip_changes_outputs():
    pm = _lora(seed=0)
    donor = _lora(seed=3)
    g = torch.Generator().manual_seed(0)
    new = {k: torch.randn(v.shape, generator=g) * 0.1 for k, v in lora.get_lora_state(donor).items()}
    pm.eval()
    with torch.no_grad():
        before = pm(input_ids=_ids()).logits.clone()
    lora.set_lora_state(pm, new)
    got = lora.get_lora_state(pm)
    assert all(torch.equal(got[k], new[k]) for k in new)
    with torch.no_grad():
        assert not torch.allclose(pm(input_ids=_ids()).logits, before)
    # the loaded tensors were copied in, not aliased
    new[next(iter(new))].add_(5.0)
    assert not torch.equal(lora.get_lora_state(pm)[next(iter(new))], new[next(iter(new))])


def test_set_lora_state_accepts_other_dtypes():
    pm = _lora()
    state = {k: v.to(torch.float64) + 0.5 for k, v in lora.get_lora_state(pm).items()}
    lora.set_lora_state(pm, state)
    got = lora.get_lora_state(pm)
    assert all(torch.allclose(got[k], state[k].float()) for k in state)


def test_set_lora_state_missing_key_fails_loudly():
    pm = _lora()
    state = lora.get_lora_state(pm)
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    del state[key]
    with pytest.raises(ValueError, match=r"missing=\[.*layers\.1\.self_attn\.v_proj\.lora_B\.weight"):
        lora.set_lora_state(pm, state)


def test_set_lora_state_unexpected_key_fails_loudly():
    pm = _lora()
    state = lora.get_lora_state(pm)
    state["base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"] = torch.zeros(8, 64)
    with pytest.raises(ValueError, match=r"unexpected=\[.*k_proj\.lora_A\.weight"):
        lora.set_lora_state(pm, state)


def test_set_lora_state_shape_mismatch_fails_and_leaves_model_unchanged():
    pm = _lora(r=8)
    original = lora.get_lora_state(pm)
    wrong_rank = lora.get_lora_state(_lora(r=4))  # same names, rank 4
    with pytest.raises(ValueError, match=r"shape mismatch: .*lora_A\.weight: got \(4, 64\), expected \(8, 64\)"):
        lora.set_lora_state(pm, wrong_rank)
    now = lora.get_lora_state(pm)
    assert all(torch.equal(now[k], original[k]) for k in original)


def test_set_lora_state_non_tensor_fails():
    pm = _lora()
    state = lora.get_lora_state(pm)
    key = next(iter(state))
    state[key] = state[key].tolist()
    with pytest.raises(ValueError, match="not tensors"):
        lora.set_lora_state(pm, state)
