"""Tests for fedshield.training.loop: local training, evaluation, LR schedule."""

import math

import pytest
import torch

from fedshield.data import synthetic, tokenize
from fedshield.config import LoraConfig
from fedshield.training import base_model, lora
from fedshield.training import loop as train
from fedshield.fl import schedule

TASKS = ("reverse", "uppercase", "add")


@pytest.fixture(scope="module")
def tok():
    return tokenize.build_tokenizer()


@pytest.fixture(scope="module")
def train_set(tok):
    return tokenize.tokenize_examples(synthetic.make_synthetic_examples(120, seed=0, tasks=TASKS), tok, 96)


@pytest.fixture(scope="module")
def eval_set(tok):
    return tokenize.tokenize_examples(synthetic.make_synthetic_examples(45, seed=1, tasks=TASKS), tok, 96)


def _lora(tok, r=8, seed=0, dropout=0.05):
    return lora.attach_lora(
        base_model.build_tiny_llama(len(tok)), LoraConfig(r=r, alpha=2 * r, dropout=dropout), seed=seed
    )


def _states_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- learning


def test_training_reduces_eval_loss(tok, train_set, eval_set):
    pm = _lora(tok, r=8)
    before = train.evaluate_loss(pm, eval_set, batch_size=45)
    # Untrained tiny model: close to uniform over the 101-token vocab.
    assert abs(before - math.log(len(tok))) < 0.3
    seen = []
    res = train.train_local(pm, train_set, steps=40, batch_size=8, lr=3e-3, seed=0,
                            progress=lambda step, loss: seen.append((step, loss)))
    after = train.evaluate_loss(pm, eval_set, batch_size=45)
    assert after < before - 0.1, (before, after)
    assert res["steps"] == 40 and res["num_examples"] == 120 and res["examples_seen"] == 320
    assert [s for s, _ in seen] == list(range(1, 41))
    assert res["loss"] == pytest.approx(sum(l for _, l in seen) / 40)
    # the loss falls during training too, not only on held-out data
    assert sum(l for _, l in seen[-10:]) < sum(l for _, l in seen[:10])


def test_training_changes_only_lora_params(tok, train_set):
    pm = _lora(tok)
    base_before = {n: p.detach().clone() for n, p in pm.named_parameters() if "lora_" not in n}
    lora_before = lora.get_lora_state(pm)
    train.train_local(pm, train_set, steps=3, batch_size=4, lr=1e-2, seed=0)
    assert all(torch.equal(p, base_before[n]) for n, p in pm.named_parameters() if "lora_" not in n)
    lora_after = lora.get_lora_state(pm)
    assert not any(torch.equal(lora_after[k], lora_before[k]) for k in lora_before)


def test_training_deterministic_for_seed(tok, train_set):
    results, states = [], []
    for seed in (5, 5, 6):
        pm = _lora(tok)  # dropout > 0, so the seed must also fix dropout masks
        results.append(train.train_local(pm, train_set, steps=4, batch_size=4, lr=1e-2, seed=seed))
        states.append(lora.get_lora_state(pm))
    assert results[0] == results[1]
    assert _states_equal(states[0], states[1])
    assert not _states_equal(states[0], states[2])


def test_training_leaves_global_rng_and_mode(tok, train_set):
    pm = _lora(tok)
    pm.eval()
    torch.manual_seed(99)
    expected = torch.rand(4)
    torch.manual_seed(99)
    train.train_local(pm, train_set, steps=2, batch_size=4, lr=1e-3, seed=0)
    assert torch.equal(torch.rand(4), expected)
    assert not pm.training  # restored


def test_grad_accum_and_cycling_small_data(tok):
    tiny = tokenize.tokenize_examples(synthetic.make_synthetic_examples(5, seed=0, tasks=TASKS), tok, 96)
    pm = _lora(tok)
    res = train.train_local(pm, tiny, steps=3, batch_size=8, lr=1e-3, seed=0, grad_accum=2,
                            max_grad_norm=None)
    # batch capped at the 5 examples, 2 micro-batches per step, data reused across epochs
    assert res["examples_seen"] == 3 * 2 * 5 and res["num_examples"] == 5
    assert math.isfinite(res["loss"])


def test_grad_accum_matches_one_big_batch(tok):
    # Same rows (same seed -> same permutation), equal completion lengths so
    # the mean of micro-batch means equals the mean over the big batch.
    exs = [e for e in synthetic.make_synthetic_examples(200, seed=0, tasks=("uppercase",)) if len(e["output"]) == 5]
    same_len = tokenize.tokenize_examples(exs[:16], tok, 96)
    runs = []
    for bs, accum in ((8, 1), (4, 2)):
        pm = _lora(tok, dropout=0.0)
        res = train.train_local(pm, same_len, steps=2, batch_size=bs, lr=1e-3, seed=0, grad_accum=accum)
        runs.append((res, lora.get_lora_state(pm)))
    (r1, s1), (r2, s2) = runs
    assert r1["examples_seen"] == r2["examples_seen"] == 16
    assert r1["loss"] == pytest.approx(r2["loss"], rel=1e-5)
    assert all(torch.allclose(s1[k], s2[k], atol=1e-5) for k in s1)


def test_train_accepts_instruction_dataset(tok):
    ds = tokenize.InstructionDataset(synthetic.make_synthetic_examples(10, seed=0, tasks=TASKS), tok, 96)
    pm = _lora(tok)
    res = train.train_local(pm, ds, steps=1, batch_size=4, lr=1e-3, seed=0)
    assert res["num_examples"] == 10
    assert math.isfinite(train.evaluate_loss(pm, ds, batch_size=4))


def test_full_finetune_of_plain_model_is_possible(tok, train_set):
    # train_local trains whatever requires grad, e.g. a base model before LoRA.
    base = base_model.build_tiny_llama(len(tok))
    w = base.lm_head.weight.detach().clone()
    train.train_local(base, train_set, steps=1, batch_size=4, lr=1e-3, seed=0)
    assert not torch.equal(base.lm_head.weight, w)


# ---------------------------------------------------------------- evaluation


def test_evaluate_loss_matches_hf_loss_and_is_batch_invariant(tok, eval_set):
    pm = _lora(tok)
    pm.train()
    whole = train.evaluate_loss(pm, eval_set, batch_size=45)
    assert pm.training  # mode restored
    chunked = train.evaluate_loss(pm, eval_set, batch_size=7)
    assert whole == pytest.approx(chunked, rel=1e-5)
    pm.eval()
    with torch.no_grad():
        hf = float(pm(**eval_set).loss)  # HF mean over unmasked shifted tokens, full padding
    assert whole == pytest.approx(hf, rel=1e-5)


def test_evaluate_loss_scores_completion_tokens_only(tok, train_set, eval_set):
    pm = _lora(tok)
    # Train a little so completion and prompt token losses drift apart
    # (an untrained model is near-uniform everywhere).
    train.train_local(pm, train_set, steps=15, batch_size=8, lr=1e-2, seed=0)
    pm.eval()
    with torch.no_grad():
        logits = pm(input_ids=eval_set["input_ids"], attention_mask=eval_set["attention_mask"]).logits
    tok_loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2), eval_set["input_ids"][:, 1:], reduction="none"
    )
    completion = (eval_set["labels"][:, 1:] != -100)
    real = eval_set["attention_mask"][:, 1:].bool()
    want = float(tok_loss[completion].mean())
    everything = float(tok_loss[real].mean())  # prompt + completion
    got = train.evaluate_loss(pm, eval_set, batch_size=16)
    assert got == pytest.approx(want, rel=1e-5)
    assert completion.sum() < real.sum() and abs(got - everything) > 0.05


# ---------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(steps=0), "steps must be an int >= 1, got 0"),
        (dict(batch_size=0), "batch_size must be an int >= 1, got 0"),
        (dict(grad_accum=0), "grad_accum must be an int >= 1, got 0"),
        (dict(lr=0.0), "lr must be a finite number > 0, got 0.0"),
        (dict(lr=float("nan")), "got nan"),
        (dict(max_grad_norm=0.0), "max_grad_norm must be > 0 or None, got 0.0"),
    ],
)
def test_train_local_bad_args(tok, train_set, kwargs, match):
    args = dict(steps=1, batch_size=2, lr=1e-3, seed=0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        train.train_local(_lora(tok), train_set, **args)


def test_bad_data_rejected(tok, train_set):
    pm = _lora(tok)
    with pytest.raises(ValueError, match=r"missing keys \['labels'\]"):
        train.train_local(pm, {k: train_set[k] for k in ("input_ids", "attention_mask")}, 1, 2, 1e-3, 0)
    with pytest.raises(ValueError, match="0 examples"):
        train.train_local(pm, {k: v[:0] for k, v in train_set.items()}, 1, 2, 1e-3, 0)
    with pytest.raises(ValueError, match="shapes differ"):
        bad = dict(train_set, labels=train_set["labels"][:, :50])
        train.evaluate_loss(pm, bad, 4)
    with pytest.raises(ValueError, match="all labels are -100"):
        train.evaluate_loss(pm, dict(train_set, labels=torch.full_like(train_set["labels"], -100)), 4)
    with pytest.raises(ValueError, match="expected a mapping of tensors"):
        train.train_local(pm, [1, 2, 3], 1, 2, 1e-3, 0)
    with pytest.raises(ValueError, match="batch_size must be an int >= 1, got 0"):
        train.evaluate_loss(pm, train_set, 0)


def test_evaluate_rejects_labels_only_on_first_token(tok, train_set):
    # A label at position 0 is never predicted (causal shift), so nothing is scored.
    labels = torch.full_like(train_set["labels"], -100)
    labels[:, 0] = 5
    with pytest.raises(ValueError, match="no completion tokens to evaluate"):
        train.evaluate_loss(_lora(tok), dict(train_set, labels=labels), 32)


def test_no_trainable_params_rejected(tok, train_set):
    base = base_model.build_tiny_llama(len(tok))
    base.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        train.train_local(base, train_set, 1, 2, 1e-3, 0)


# ---------------------------------------------------------------- cosine_lr


def test_cosine_lr_schedule():
    lrs = [schedule.cosine_lr(i, 4, 1e-3, 1e-4) for i in range(4)]
    assert lrs[0] == pytest.approx(1e-3)
    assert lrs[2] == pytest.approx(5.5e-4)  # halfway through the cosine
    assert all(a > b for a, b in zip(lrs, lrs[1:]))
    assert lrs[-1] > 1e-4  # final round still above the floor
    assert schedule.cosine_lr(0, 1, 2e-3, 0.0) == pytest.approx(2e-3)
    assert schedule.cosine_lr(1, 2, 1e-3, 1e-3) == pytest.approx(1e-3)


@pytest.mark.parametrize(
    "args, match",
    [
        ((0, 0, 1e-3, 0.0), "total_rounds must be an int >= 1, got 0"),
        ((3, 3, 1e-3, 0.0), r"round_idx must be an int in \[0, 3\), got 3"),
        ((-1, 3, 1e-3, 0.0), "got -1"),
        ((0, 3, 1e-3, -1e-4), "lr_min must be >= 0, got -0.0001"),
        ((0, 3, 1e-4, 1e-3), r"lr_max \(0.0001\) must be >= lr_min \(0.001\)"),
    ],
)
def test_cosine_lr_bad_inputs(args, match):
    with pytest.raises(ValueError, match=match):
        schedule.cosine_lr(*args)
