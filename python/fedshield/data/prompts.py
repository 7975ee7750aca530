"""Prompt templates: the Alpaca template (Taori et al., 2023) and its preamble-free variant."""

from __future__ import annotations

from typing import List, Sequence

# A prompt cut from the left keeps at least this many tokens besides bos (fewer would lose the
# "### Response:" marker); an example that cannot keep them is skipped.
MIN_PROMPT_TOKENS = 8
# The shortest sequence that can hold an example: bos, the kept prompt, one answer token, eos.
MIN_SEQUENCE_TOKENS = MIN_PROMPT_TOKENS + 3

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



def prompt_tail(ids: Sequence[int], limit: int, bos_token_id: int | None
                ) -> tuple[List[int], int]:
    """The prompt cut from the left to at most `limit` tokens, a leading bos kept, so the
    "### Response:" marker at its end survives. Returns (ids, prompt tokens kept besides bos)."""
    ids = list(ids)
    bos = ids[:1] if bos_token_id is not None and ids and ids[0] == bos_token_id else []
    if len(ids) <= limit:
        return ids, len(ids) - len(bos)
    room = max(limit - len(bos), 0)
    return bos + ids[len(ids) - room:] if room else bos, room
