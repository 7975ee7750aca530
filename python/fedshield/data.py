"""Synthetic instruction data, non-IID client splits and an offline tokenizer.

Everything here is built locally: no model or dataset hub is contacted, so
the federated pipeline can be exercised on machines without network access.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import torch
from torch.utils.data import Dataset

logger = logging.getLogger("fedshield")

# Exact Alpaca prompt templates (Taori et al., 2023).
ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task, paired with an input that "
    "provides further context. Write a response that appropriately completes "
    "the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_TEMPLATE_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that "
    "appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
# Same section markers without the constant preamble: the preamble carries no
# signal for the tiny demo model but would triple the sequence length.
COMPACT_TEMPLATE = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
COMPACT_TEMPLATE_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
IGNORE_INDEX = -100  # label value ignored by torch cross-entropy / HF models


def format_prompt(instruction: str, input: str = "", compact: bool = False) -> str:
    """Render the Alpaca prompt (everything up to and including "### Response:\\n").

    The no-input variant is used when ``input`` is empty or whitespace, as in
    the original Alpaca code. ``compact=True`` drops the preamble sentence.
    """
    has_input = bool(input and input.strip())
    if compact:
        template = COMPACT_TEMPLATE if has_input else COMPACT_TEMPLATE_NO_INPUT
    else:
        template = ALPACA_TEMPLATE if has_input else ALPACA_TEMPLATE_NO_INPUT
    if has_input:
        return template.format(instruction=instruction, input=input)
    return template.format(instruction=instruction)


# --------------------------------------------------------------------------
# Synthetic tasks
# --------------------------------------------------------------------------

_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _word(rng: random.Random) -> str:
    # Random letter strings rather than a word list: unlimited, no bundled data.
    return "".join(rng.choice(_LETTERS) for _ in range(rng.randint(3, 6)))


def _task_reverse(rng: random.Random):
    w = _word(rng)
    return "Reverse the word.", w, w[::-1]


def _task_uppercase(rng: random.Random):
    w = _word(rng)
    return "Uppercase the word.", w, w.upper()


def _task_add(rng: random.Random):
    a, b = rng.randint(0, 49), rng.randint(0, 49)
    return "Add the two numbers.", f"{a} + {b}", str(a + b)


def _task_sort(rng: random.Random):
    w = _word(rng)
    return "Sort the letters.", w, "".join(sorted(w))


def _task_repeat(rng: random.Random):
    w = _word(rng)
    return "Repeat the word twice.", w, f"{w} {w}"


TASKS: Dict[str, Callable[[random.Random], tuple]] = {
    "reverse": _task_reverse,
    "uppercase": _task_uppercase,
    "add": _task_add,
    "sort": _task_sort,
    "repeat": _task_repeat,
}


def make_synthetic_examples(
    n: int, seed: int, tasks: Optional[Sequence[str]] = None
) -> List[Dict[str, str]]:
    """Return ``n`` examples (keys instruction, input, output, task).

    Tasks are cycled in order so every task is equally represented; the
    content is drawn from ``random.Random(seed)`` so it is deterministic and
    never touches the global RNG.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    names = list(TASKS) if tasks is None else list(tasks)
    if not names:
        raise ValueError(f"tasks must be non-empty, got {tasks!r}")
    unknown = [t for t in names if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; known: {sorted(TASKS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate task names in {names}")
    rng = random.Random(seed)
    out = []
    for i in range(n):
        task = names[i % len(names)]
        instruction, inp, output = TASKS[task](rng)
        out.append({"instruction": instruction, "input": inp, "output": output, "task": task})
    return out


def split_non_iid(
    examples: Sequence[Mapping[str, str]],
    n_clients: int,
    seed: int,
    dominant: float = 0.8,
) -> List[List[Mapping[str, str]]]:
    """Partition ``examples`` into ``n_clients`` label-skewed shards.

    Client ``c`` is assigned dominant task ``tasks[c % n_tasks]`` (tasks in
    first-appearance order) and receives ``round(dominant * size)`` examples
    of it where the pool allows; the rest of its shard is filled from the
    other tasks, taking from whichever has most left so the minority mix stays
    balanced. Every example lands in exactly one shard, shard sizes differ by
    at most one, and the result depends only on ``seed``.
    """
    n = len(examples)
    if isinstance(n_clients, bool) or not isinstance(n_clients, int) or n_clients < 1:
        raise ValueError(f"n_clients must be an int >= 1, got {n_clients!r}")
    if n_clients > n:
        raise ValueError(
            f"n_clients={n_clients} is more than the number of examples ({n}); "
            "every client needs at least one example"
        )
    if not 0.0 <= dominant <= 1.0:
        raise ValueError(f"dominant must be in [0, 1], got {dominant}")
    missing = [i for i, ex in enumerate(examples) if "task" not in ex]
    if missing:
        raise ValueError(f"examples at indices {missing[:5]} have no 'task' key")

    rng = random.Random(seed)
    task_order = list(dict.fromkeys(ex["task"] for ex in examples))
    pools: Dict[str, List[Mapping[str, str]]] = {t: [] for t in task_order}
    for ex in examples:
        pools[ex["task"]].append(ex)
    for t in task_order:
        rng.shuffle(pools[t])

    sizes = [n // n_clients + (1 if c < n % n_clients else 0) for c in range(n_clients)]
    dom_task = [task_order[c % len(task_order)] for c in range(n_clients)]
    shards: List[List[Mapping[str, str]]] = [[] for _ in range(n_clients)]

    # Phase 1: dominant examples. Clients sharing a dominant task share its
    # pool; if the pool is short, each gets a proportional part of it.
    for t in task_order:
        clients = [c for c in range(n_clients) if dom_task[c] == t]
        if not clients:
            continue
        wants = [round(dominant * sizes[c]) for c in clients]
        total_want = sum(wants)
        avail = len(pools[t])
        if total_want > avail:
            wants = [w * avail // total_want for w in wants]
        for c, w in zip(clients, wants):
            shards[c].extend(pools[t][:w])
            del pools[t][:w]

    # Phase 2: fill the remaining slots one example at a time, round-robin,
    # preferring non-dominant tasks. Leftovers exactly equal remaining needs.
    needs = [sizes[c] - len(shards[c]) for c in range(n_clients)]
    while any(needs):
        for c in range(n_clients):
            if not needs[c]:
                continue
            others = [t for t in task_order if t != dom_task[c] and pools[t]]
            if others:
                t = max(others, key=lambda k: len(pools[k]))  # ties: first in order
            else:
                t = next(k for k in task_order if pools[k])
            shards[c].append(pools[t].pop())
            needs[c] -= 1

    for shard in shards:
        rng.shuffle(shard)  # so dominant examples are not all at the front
    for c, shard in enumerate(shards):
        counts = Counter(ex["task"] for ex in shard)
        logger.debug("client %d: %d examples, tasks %s", c, len(shard), dict(counts))
    return shards


# --------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------


def build_tokenizer(model_max_length: int = 256):
    """Character-level fast tokenizer built offline with ``tokenizers``.

    Vocab: 4 specials (<pad>=0, <s>=1, </s>=2, <unk>=3) + printable ASCII
    (space..~) + newline + tab = 101 tokens. Encoding with special tokens
    prepends <s>; eos is appended explicitly by :func:`tokenize_examples` so
    prompts used for generation do not end in </s>.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 127)] + ["\n", "\t"]
    vocab = {tok: i for i, tok in enumerate(list(SPECIAL_TOKENS) + chars)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # Every character (newlines included, hence [\s\S]) is its own token.
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()  # join characters without inserting spaces
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=model_max_length,
        padding_side="right",
    )
    return tok


# --------------------------------------------------------------------------
# Tokenised tensors
# --------------------------------------------------------------------------


def tokenize_examples(
    examples: Sequence[Mapping[str, str]],
    tokenizer,
    max_len: int = 96,
    compact: bool = True,
) -> Dict[str, torch.Tensor]:
    """Tokenise into right-padded ``input_ids``, ``attention_mask``, ``labels``.

    Sequence = <s> + prompt + output + </s>. Labels copy the ids on the output
    and </s> and are -100 on the prompt and on padding, so the loss covers the
    completion only. ``compact`` selects the preamble-free template (default,
    to fit ``max_len=96``). An example that does not fit raises rather than
    being truncated, since silent truncation would drop the answer.
    """
    if len(examples) == 0:
        raise ValueError("examples is empty; nothing to tokenize")
    if max_len < 2:
        raise ValueError(f"max_len must be >= 2, got {max_len}")
    for key in ("pad_token_id", "eos_token_id"):
        if getattr(tokenizer, key, None) is None:
            raise ValueError(f"tokenizer has no {key}")

    rows, label_rows = [], []
    for i, ex in enumerate(examples):
        prompt = format_prompt(ex["instruction"], ex.get("input", ""), compact=compact)
        p_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        c_ids = tokenizer(ex["output"], add_special_tokens=False)["input_ids"]
        c_ids = list(c_ids) + [tokenizer.eos_token_id]
        ids = list(p_ids) + c_ids
        if len(ids) > max_len:
            raise ValueError(
                f"example {i} is {len(ids)} tokens, longer than max_len={max_len}"
            )
        rows.append(ids)
        label_rows.append([IGNORE_INDEX] * len(p_ids) + c_ids)

    return pad_rows(rows, label_rows, max_len, tokenizer.pad_token_id)


def pad_rows(rows, label_rows, max_len: int, pad_id: int) -> Dict[str, torch.Tensor]:
    """Right-padded input_ids / attention_mask / labels (-100 on padding) from token rows."""
    n = len(rows)
    input_ids = torch.full((n, max_len), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, max_len), dtype=torch.long)
    labels = torch.full((n, max_len), IGNORE_INDEX, dtype=torch.long)
    for i, (ids, lab) in enumerate(zip(rows, label_rows)):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention_mask[i, : len(ids)] = 1
        labels[i, : len(lab)] = torch.tensor(lab)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class InstructionDataset(Dataset):
    """Map-style dataset over :func:`tokenize_examples` output.

    ``.tensors`` holds the full batch-first tensors, which is what
    :func:`fedshield.train.train_local` and ``evaluate_loss`` consume.
    """

    def __init__(self, examples, tokenizer, max_len: int = 96, compact: bool = True):
        self.tensors = tokenize_examples(examples, tokenizer, max_len, compact=compact)

    def __len__(self) -> int:
        return self.tensors["input_ids"].shape[0]

    def __getitem__(self, idx: int) -> Dict[str, torch.Tensor]:
        return {k: v[idx] for k, v in self.tensors.items()}
