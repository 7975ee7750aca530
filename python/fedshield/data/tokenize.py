"""Tokenisation of instruction examples: an offline character-level tokenizer for the tiny demo
model, strict tokenisation, and length-safe tokenisation that keeps the answer."""

from __future__ import annotations

import logging
from typing import Dict, Mapping, Sequence

import torch
from torch.utils.data import Dataset

from ..base.errors import DataError, ParameterError
from .prompts import MIN_PROMPT_TOKENS, format_prompt, prompt_tail

log = logging.getLogger("fedshield")

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
IGNORE_INDEX = -100  # label value ignored by torch cross-entropy / HF models


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
    :func:`fedshield.training.loop.train_local` and ``evaluate_loss`` consume.
    """

    def __init__(self, examples, tokenizer, max_len: int = 96, compact: bool = True):
        self.tensors = tokenize_examples(examples, tokenizer, max_len, compact=compact)

    def __len__(self) -> int:
        return self.tensors["input_ids"].shape[0]

    def __getitem__(self, idx: int) -> Dict[str, torch.Tensor]:
        return {k: v[idx] for k, v in self.tensors.items()}


def tokenize_fitting(examples: Sequence[Mapping[str, str]], tokenizer, max_len: int,
                     compact: bool = True, source: str = "data"
                     ) -> tuple[Dict[str, "torch.Tensor"], Dict[str, int]]:
    """Like :func:`tokenize_examples`, but long examples do not stop the run.

    A sequence is [bos] + prompt + output + eos; the loss covers output + eos only. When it is
    longer than ``max_len``, the prompt loses tokens from its left (after bos), so the
    "### Response:" marker and the whole answer survive. An example whose answer + eos (plus
    bos and at least 8 prompt tokens) cannot fit is skipped: truncating the answer would teach
    the model to stop early. Returns the tensors and ``{"kept", "truncated", "skipped"}``;
    if every example is skipped it raises :class:`fedshield.DataError`.
    """

    if max_len < 2:
        raise ParameterError(f"max_len must be >= 2, got {max_len}")
    for attr in ("pad_token_id", "eos_token_id"):
        if getattr(tokenizer, attr, None) is None:
            raise ParameterError(f"tokenizer has no {attr}")
    min_prompt = MIN_PROMPT_TOKENS
    rows, label_rows = [], []
    truncated = skipped = 0
    for ex in examples:
        prompt = format_prompt(ex["instruction"], ex.get("input", ""), compact=compact)
        p_ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
        c_ids = list(tokenizer(ex["output"], add_special_tokens=False)["input_ids"])
        c_ids.append(tokenizer.eos_token_id)
        if len(p_ids) + len(c_ids) > max_len:
            p_ids, kept = prompt_tail(p_ids, max_len - len(c_ids), tokenizer.bos_token_id)
            if kept < min_prompt:
                skipped += 1
                continue
            truncated += 1
        rows.append(p_ids + c_ids)
        label_rows.append([IGNORE_INDEX] * len(p_ids) + c_ids)
    stats = {"kept": len(rows), "truncated": truncated, "skipped": skipped}
    if truncated or skipped:
        log.info("%s: %d examples longer than max_len=%d: %d had their prompt cut from the "
                 "left, %d were skipped (answer too long)", source, truncated + skipped,
                 max_len, truncated, skipped)
    if not rows:
        raise DataError(f"{source}: all {len(examples)} examples have answers too long for "
                        f"max_len={max_len}; raise max_len")
    return pad_rows(rows, label_rows, max_len, tokenizer.pad_token_id), stats
