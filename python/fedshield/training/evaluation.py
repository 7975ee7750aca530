"""Held-out evaluation of a global model: loss, perplexity, generated samples; `fedshield eval`."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Mapping, Sequence

import torch

from ..base.atomic import write_json_atomic
from ..data.files import load_instruction_data
from ..data.prompts import format_prompt, prompt_tail
from ..data.tokenize import tokenize_fitting
from ..config import check_max_len
from ..base.errors import ParameterError
from .metrics import perplexity
from .base_model import load_local_model, load_local_tokenizer, resolve_device
from .loop import evaluate_loss
from ..base.validate import is_int

log = logging.getLogger("fedshield")

# Written beside a saved adapter: what evaluating it again needs to match training.
ADAPTER_META = "fedshield_adapter.json"


def generate_samples(model, tokenizer, examples: Sequence[Mapping[str, str]], *,
                     compact: bool, max_new_tokens: int) -> list[dict]:
    """Greedy answers of `model` to the prompts of `examples` (alpaca template, as trained)."""
    if not examples or max_new_tokens < 1:
        return []
    device = next(model.parameters()).device
    positions = (getattr(model.config, "max_position_embeddings", None)
                 or getattr(model.config, "n_positions", None) or 1 << 30)
    was_training = model.training
    model.eval()
    samples = []
    try:
        for ex in examples:
            prompt = format_prompt(ex["instruction"], ex.get("input", ""), compact=compact)
            ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
            new_tokens = min(max_new_tokens, positions - 1)
            ids, _ = prompt_tail(ids, positions - new_tokens, tokenizer.bos_token_id)
            input_ids = torch.tensor([ids], device=device)
            with torch.no_grad():
                out = model.generate(input_ids=input_ids,
                                     attention_mask=torch.ones_like(input_ids),
                                     max_new_tokens=new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id,
                                     eos_token_id=tokenizer.eos_token_id)
            text = tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)
            samples.append({"instruction": ex["instruction"], "input": ex.get("input", ""),
                            "reference": ex["output"], "generated": text})
    finally:
        model.train(was_training)
    return samples


def write_adapter_meta(adapter_dir: Path, *, compact: bool, max_len: int, base: str) -> None:
    meta = {"template": "compact" if compact else "alpaca", "max_len": max_len, "base": base}
    write_json_atomic(Path(adapter_dir) / ADAPTER_META, meta)


# The weight files peft may write, in the order it looks for them.
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def _read_adapter(adapter_dir: Path) -> tuple[dict, dict]:
    """The adapter's PEFT config and fedshield's note beside it ({} when absent), once its
    weights are known to be whole: every check a damaged directory fails, before any model
    loads."""
    from safetensors import SafetensorError, safe_open  # noqa: PLC0415

    flag = f"--adapter {str(adapter_dir)!r}"
    config_path = adapter_dir / "adapter_config.json"
    if not config_path.is_file():
        raise ParameterError(f"{flag}: no adapter_config.json; expected a PEFT adapter "
                             "directory (a run's DIR/adapter)")
    config = _json_object(config_path, flag)
    weights = next((adapter_dir / n for n in ADAPTER_WEIGHTS if (adapter_dir / n).is_file()),
                   None)
    if weights is None:
        raise ParameterError(f"{flag}: the adapter's weights are missing (no "
                             f"{' or '.join(ADAPTER_WEIGHTS)} beside adapter_config.json)")
    if weights.suffix == ".safetensors":
        try:
            with safe_open(str(weights), framework="pt") as fh:
                tensors = list(fh.keys())
        except (SafetensorError, OSError) as exc:
            raise ParameterError(f"{flag}: {weights.name} is damaged or truncated ({exc}); "
                                 "write the adapter again (`fedshield run --resume DIR` "
                                 "rewrites a run's adapter)") from exc
        if not tensors:
            raise ParameterError(f"{flag}: {weights.name} holds no tensors")
    meta_path = adapter_dir / ADAPTER_META
    return config, _json_object(meta_path, flag) if meta_path.is_file() else {}


def _json_object(path: Path, flag: str) -> dict:
    try:
        value = json.loads(path.read_text())
    except (ValueError, OSError) as exc:
        raise ParameterError(f"{flag}: {path.name} is not JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise ParameterError(f"{flag}: {path.name} holds a {type(value).__name__}, not an "
                             "object")
    return value


def evaluate_adapter(adapter: str | Path, model: str | Path | None = None,
                     data: str | Path | None = None, *, columns: str = "",
                     max_examples: int = 0, max_len: int | None = None,
                     template: str = "auto", samples: int = 3, sample_tokens: int = 32,
                     device: str = "auto") -> dict:
    """Loss, perplexity and samples of a saved adapter over an instruction-data file.

    `model` defaults to the base the adapter names; `template` and `max_len` default to
    what the run trained with (read from the adapter directory).
    """
    from peft import PeftModel  # noqa: PLC0415
    from safetensors import SafetensorError  # noqa: PLC0415

    for name, value in (("--max-examples", max_examples), ("--samples", samples),
                        ("--sample-tokens", sample_tokens)):
        if not is_int(value) or value < 0:
            raise ParameterError(f"{name} {value!r} must be an int >= 0")
    if max_len is not None:
        check_max_len(max_len, "--max-len")
    if template not in ("auto", "alpaca", "compact"):
        raise ParameterError(f"template={template!r} is not one of ('auto', 'alpaca', 'compact')")
    adapter = Path(adapter)
    config, meta = _read_adapter(adapter)
    if not meta and (template == "auto" or max_len is None):
        raise ParameterError(f"--adapter {str(adapter)!r} has no {ADAPTER_META} (which "
                             "`fedshield run` writes beside the adapter: the template and "
                             "max_len it trained with); give --template alpaca|compact and "
                             "--max-len N to evaluate it anyway")
    base = Path(model) if model else Path(config.get("base_model_name_or_path") or "")
    if not str(base) or not base.is_dir():
        raise ParameterError(f"--model {str(base)!r}: the adapter's base model is not a local "
                             "directory; pass --model PATH")
    if data is None:
        raise ParameterError("--data PATH is needed: an instruction-data file to evaluate on")
    if template == "auto":
        template = meta.get("template")
        if template not in ("alpaca", "compact"):
            raise ParameterError(f"--adapter {str(adapter)!r}: {ADAPTER_META} names the "
                                 f"template {template!r}; give --template alpaca|compact")
    compact = template == "compact"
    if max_len is None:
        max_len = meta.get("max_len")
        if not is_int(max_len):
            raise ParameterError(f"--adapter {str(adapter)!r}: {ADAPTER_META} has max_len="
                                 f"{max_len!r}; give --max-len N")
        check_max_len(max_len, f"{ADAPTER_META}: max_len")
    examples = load_instruction_data(data, columns)
    if max_examples:
        examples = examples[:max_examples]
    tokenizer = load_local_tokenizer(base)
    base_model = load_local_model(base, vocab_size=len(tokenizer), max_len=max_len)
    try:
        peft_model = PeftModel.from_pretrained(base_model, str(adapter))
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as exc:
        raise ParameterError(f"--adapter {str(adapter)!r} does not load onto --model "
                             f"{str(base)!r}: {exc}") from exc
    peft_model.to(resolve_device(device))
    tensors, stats = tokenize_fitting(examples, tokenizer, max_len, compact=compact,
                                      source=str(data))
    loss = evaluate_loss(peft_model, tensors, batch_size=16)
    return {"adapter": str(adapter), "model": str(base), "data": str(data),
            "examples": stats["kept"], "truncated": stats["truncated"],
            "skipped": stats["skipped"], "template": template, "max_len": max_len,
            "eval_loss": loss, "perplexity": perplexity(loss),
            "samples": generate_samples(peft_model, tokenizer, examples[:samples],
                                        compact=compact, max_new_tokens=sample_tokens)}
