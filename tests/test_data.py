"""Tests for fedshield.data: prompts, synthetic tasks, non-IID split, tokenizer."""

import string
from collections import Counter

import pytest
import torch

from fedshield.data import prompts, splits, synthetic, tokenize


@pytest.fixture(scope="module")
def tok():
    return tokenize.build_tokenizer()


# ---------------------------------------------------------------- prompts


def test_format_prompt_with_input_is_exact_alpaca():
    expected = (
        "Below is an instruction that describes a task, paired with an input that "
        "provides further context. Write a response that appropriately completes "
        "the request.\n\n### Instruction:\nDo X.\n\n### Input:\nabc\n\n### Response:\n"
    )
    assert prompts.format_prompt("Do X.", "abc") == expected


def test_format_prompt_without_input_uses_no_input_variant():
    expected = (
        "Below is an instruction that describes a task. Write a response that "
        "appropriately completes the request.\n\n### Instruction:\nDo X.\n\n### Response:\n"
    )
    assert prompts.format_prompt("Do X.", "") == expected
    assert prompts.format_prompt("Do X.") == expected
    assert prompts.format_prompt("Do X.", "   ") == expected  # whitespace counts as empty
    assert "### Input:" not in prompts.format_prompt("Do X.")


def test_format_prompt_compact_drops_preamble_only():
    full = prompts.format_prompt("Do X.", "abc")
    compact = prompts.format_prompt("Do X.", "abc", compact=True)
    assert compact == "### Instruction:\nDo X.\n\n### Input:\nabc\n\n### Response:\n"
    assert full.endswith(compact)
    assert prompts.format_prompt("Do X.", compact=True) == "### Instruction:\nDo X.\n\n### Response:\n"


# ---------------------------------------------------------------- synthetic tasks


def test_synthetic_examples_deterministic_and_seed_dependent():
    a = synthetic.make_synthetic_examples(50, seed=3)
    b = synthetic.make_synthetic_examples(50, seed=3)
    c = synthetic.make_synthetic_examples(50, seed=4)
    assert a == b
    assert a != c
    assert len(a) == 50
    assert all(set(ex) == {"instruction", "input", "output", "task"} for ex in a)


def test_synthetic_tasks_are_correct_and_balanced():
    exs = synthetic.make_synthetic_examples(100, seed=0)
    counts = Counter(ex["task"] for ex in exs)
    assert len(counts) >= 4
    assert max(counts.values()) - min(counts.values()) <= 1
    for ex in exs:
        inp, out = ex["input"], ex["output"]
        if ex["task"] == "reverse":
            assert out == inp[::-1]
        elif ex["task"] == "uppercase":
            assert out == inp.upper()
        elif ex["task"] == "add":
            a, b = inp.split(" + ")
            assert int(out) == int(a) + int(b)
        elif ex["task"] == "sort":
            assert out == "".join(sorted(inp))
        elif ex["task"] == "repeat":
            assert out == f"{inp} {inp}"
        else:
            pytest.fail(f"untested task {ex['task']}")
    # one instruction per task keeps the tasks learnable for a tiny model
    for task in counts:
        assert len({ex["instruction"] for ex in exs if ex["task"] == task}) == 1


def test_synthetic_task_subset():
    exs = synthetic.make_synthetic_examples(30, seed=1, tasks=("add", "reverse"))
    assert {ex["task"] for ex in exs} == {"add", "reverse"}


def test_synthetic_does_not_touch_global_random():
    import random

    random.seed(11)
    expected = random.random()
    random.seed(11)
    synthetic.make_synthetic_examples(20, seed=0)
    assert random.random() == expected


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n=0, seed=0), "n must be >= 1, got 0"),
        (dict(n=5, seed=0, tasks=()), r"tasks must be non-empty"),
        (dict(n=5, seed=0, tasks=("reverse", "fly")), r"unknown task\(s\) \['fly'\]"),
        (dict(n=5, seed=0, tasks=("add", "add")), "duplicate task"),
    ],
)
def test_synthetic_bad_inputs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        synthetic.make_synthetic_examples(**kwargs)


# ---------------------------------------------------------------- non-IID split


def _ids(shards):
    return sorted(id(ex) for shard in shards for ex in shard)


def test_split_non_iid_proportions():
    exs = synthetic.make_synthetic_examples(600, seed=0, tasks=("reverse", "uppercase", "add"))
    shards = splits.split_non_iid(exs, n_clients=3, seed=0, dominant=0.8)
    assert [len(s) for s in shards] == [200, 200, 200]
    assert _ids(shards) == sorted(id(ex) for ex in exs)  # exact partition
    dominants = []
    for shard in shards:
        counts = Counter(ex["task"] for ex in shard)
        task, top = counts.most_common(1)[0]
        dominants.append(task)
        assert top == 160  # round(0.8 * 200)
        others = sorted(v for t, v in counts.items() if t != task)
        assert others == [20, 20]  # minority mix split evenly
    assert dominants == ["reverse", "uppercase", "add"]


def test_split_non_iid_shared_dominant_and_uneven_sizes():
    exs = synthetic.make_synthetic_examples(101, seed=2, tasks=("reverse", "add"))
    shards = splits.split_non_iid(exs, n_clients=4, seed=5, dominant=0.9)
    sizes = [len(s) for s in shards]
    assert sum(sizes) == 101 and max(sizes) - min(sizes) <= 1
    assert _ids(shards) == sorted(id(ex) for ex in exs)
    for c, shard in enumerate(shards):
        counts = Counter(ex["task"] for ex in shard)
        # clients 0,2 share "reverse", 1,3 share "add"
        assert counts.most_common(1)[0][0] == ("reverse", "add")[c % 2]
        assert counts.most_common(1)[0][1] / len(shard) >= 0.85


def test_split_non_iid_deterministic_and_seeded():
    exs = synthetic.make_synthetic_examples(90, seed=0)
    a = splits.split_non_iid(exs, 3, seed=1)
    b = splits.split_non_iid(exs, 3, seed=1)
    c = splits.split_non_iid(exs, 3, seed=2)
    assert a == b
    assert a != c


def test_split_non_iid_one_example_per_client():
    exs = synthetic.make_synthetic_examples(5, seed=0)
    shards = splits.split_non_iid(exs, 5, seed=0)
    assert all(len(s) == 1 for s in shards)
    assert _ids(shards) == sorted(id(ex) for ex in exs)


def test_split_non_iid_dominant_zero_is_still_a_partition():
    exs = synthetic.make_synthetic_examples(60, seed=0, tasks=("reverse", "add", "sort"))
    shards = splits.split_non_iid(exs, 3, seed=0, dominant=0.0)
    assert _ids(shards) == sorted(id(ex) for ex in exs)
    for c, shard in enumerate(shards):
        own = ("reverse", "add", "sort")[c]
        assert all(ex["task"] != own for ex in shard)


@pytest.mark.parametrize(
    "n_clients, dominant, match",
    [
        (0, 0.8, "n_clients must be an int >= 1, got 0"),
        (-2, 0.8, "got -2"),
        (11, 0.8, "n_clients=11 is more than the number of examples"),
        (2, 1.5, "dominant must be in \\[0, 1\\], got 1.5"),
        (2, -0.1, "got -0.1"),
    ],
)
def test_split_non_iid_bad_inputs(n_clients, dominant, match):
    exs = synthetic.make_synthetic_examples(10, seed=0)
    with pytest.raises(ValueError, match=match):
        splits.split_non_iid(exs, n_clients, seed=0, dominant=dominant)


def test_split_non_iid_missing_task_key():
    exs = [{"instruction": "a", "input": "", "output": "b"}] * 3
    with pytest.raises(ValueError, match="no 'task' key"):
        splits.split_non_iid(exs, 2, seed=0)


# ---------------------------------------------------------------- tokenizer


def test_tokenizer_vocab_and_specials(tok):
    assert 90 <= len(tok) <= 110
    assert (tok.pad_token, tok.bos_token, tok.eos_token, tok.unk_token) == ("<pad>", "<s>", "</s>", "<unk>")
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)


def test_tokenizer_round_trip_is_character_level(tok):
    text = prompts.format_prompt("Reverse the word.", "abc") + "cba" + string.printable[:95]
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text)  # one token per character
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == text
    with_bos = tok(text)["input_ids"]
    assert with_bos[0] == tok.bos_token_id and with_bos[1:] == ids
    assert tok.decode(with_bos, skip_special_tokens=True) == text


def test_tokenizer_unknown_char_maps_to_unk(tok):
    ids = tok("a\u00e9b", add_special_tokens=False)["input_ids"]
    assert ids[1] == tok.unk_token_id and len(ids) == 3


def test_tokenizer_save_and_reload(tok, tmp_path):
    from transformers import AutoTokenizer

    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    text = "### Response:\nHELLO 42\n"
    assert again(text)["input_ids"] == tok(text)["input_ids"]
    assert again.get_vocab() == tok.get_vocab()
    assert (again.pad_token_id, again.bos_token_id, again.eos_token_id, again.unk_token_id) == (0, 1, 2, 3)
    assert again.decode(again(text)["input_ids"], skip_special_tokens=True) == text


# ---------------------------------------------------------------- tokenised tensors


def test_tokenize_examples_masks_prompt_and_padding(tok):
    exs = synthetic.make_synthetic_examples(12, seed=0)
    t = tokenize.tokenize_examples(exs, tok, max_len=96)
    assert set(t) == {"input_ids", "attention_mask", "labels"}
    assert all(v.shape == (12, 96) and v.dtype == torch.long for v in t.values())
    for i, ex in enumerate(exs):
        ids, mask, labels = t["input_ids"][i], t["attention_mask"][i], t["labels"][i]
        prompt = prompts.format_prompt(ex["instruction"], ex["input"], compact=True)
        p_len = 1 + len(prompt)  # <s> + one token per character
        length = int(mask.sum())
        assert length == p_len + len(ex["output"]) + 1
        assert mask[:length].all() and not mask[length:].any()  # right padding
        assert ids[0] == tok.bos_token_id and ids[length - 1] == tok.eos_token_id
        assert (ids[length:] == tok.pad_token_id).all()
        assert (labels[:p_len] == -100).all()  # prompt masked
        assert (labels[length:] == -100).all()  # padding masked
        assert torch.equal(labels[p_len:length], ids[p_len:length])
        assert tok.decode(labels[p_len:length].tolist()) == ex["output"] + "</s>"
        assert tok.decode(ids[:length].tolist(), skip_special_tokens=True) == prompt + ex["output"]


def test_all_synthetic_examples_fit_96(tok):
    exs = synthetic.make_synthetic_examples(500, seed=9)
    t = tokenize.tokenize_examples(exs, tok, max_len=96)
    assert int(t["attention_mask"].sum(1).max()) <= 96


def test_tokenize_examples_full_template(tok):
    exs = synthetic.make_synthetic_examples(3, seed=0)
    t = tokenize.tokenize_examples(exs, tok, max_len=256, compact=False)
    text = tok.decode(t["input_ids"][0].tolist(), skip_special_tokens=True)
    assert text.startswith("Below is an instruction")


def test_tokenize_examples_bad_inputs(tok):
    with pytest.raises(ValueError, match="examples is empty"):
        tokenize.tokenize_examples([], tok, 96)
    exs = synthetic.make_synthetic_examples(3, seed=0)
    with pytest.raises(ValueError, match=r"example 0 is \d+ tokens, longer than max_len=20"):
        tokenize.tokenize_examples(exs, tok, max_len=20)
    with pytest.raises(ValueError, match="max_len must be >= 2, got 1"):
        tokenize.tokenize_examples(exs, tok, max_len=1)


def test_tokenize_examples_requires_pad_and_eos(tok):
    class NoPad:
        pad_token_id = None
        eos_token_id = 2

    with pytest.raises(ValueError, match="pad_token_id"):
        tokenize.tokenize_examples(synthetic.make_synthetic_examples(2, 0), NoPad(), 96)


def test_instruction_dataset(tok):
    exs = synthetic.make_synthetic_examples(7, seed=0)
    ds = tokenize.InstructionDataset(exs, tok, max_len=96)
    assert len(ds) == 7
    item = ds[3]
    assert torch.equal(item["input_ids"], ds.tensors["input_ids"][3])
    assert set(item) == {"input_ids", "attention_mask", "labels"}
    with pytest.raises(ValueError, match="examples is empty"):
        tokenize.InstructionDataset([], tok)
