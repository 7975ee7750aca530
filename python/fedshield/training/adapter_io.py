"""A trained adapter on disk: OUT/adapter (PEFT) over its base model directory."""

from __future__ import annotations

import contextlib
from pathlib import Path

from ..base.atomic import replacing_directory
from ..base.errors import StorageError
from ..config import ModelConfig
from .base_model import TINY_INIT_STD, build_tiny_llama


@contextlib.contextmanager
def _hf_progress(show: bool):
    """transformers' own progress bars (e.g. "Writing model shards") only when we show ours."""
    from transformers.utils import logging as hf_logging  # noqa: PLC0415

    was = hf_logging.is_progress_bar_enabled()
    if not show:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def save_adapter(model, tokenizer, out: Path, model_cfg: ModelConfig, *, seed: int,
                 show_progress: bool = False) -> Path:
    """OUT/adapter (a PEFT adapter) over its base: OUT/base_model (the tiny base and its
    tokenizer, rebuilt from ``seed``), or the --model directory itself, by absolute path.
    Returns the base directory."""
    from safetensors import SafetensorError  # noqa: PLC0415

    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageError(f"cannot create {str(out)!r}: {exc.strerror or exc}") from exc
    # Each directory is written beside its target and swapped in whole: a full disk or a
    # read-only directory raises StorageError and leaves the previous adapter as it was.
    write_errors = (SafetensorError,)
    if model_cfg.name == "tiny":
        base_dir = out / "base_model"
        base = build_tiny_llama(len(tokenizer), seed=seed, init_std=TINY_INIT_STD)
        with replacing_directory(base_dir, write_errors) as tmp, _hf_progress(show_progress):
            base.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    else:
        base_dir = Path(model_cfg.name)
    for peft_config in model.peft_config.values():
        peft_config.base_model_name_or_path = str(base_dir.resolve())
    with replacing_directory(out / "adapter", write_errors) as tmp, _hf_progress(show_progress):
        model.save_pretrained(tmp)
        for weights in Path(tmp).glob("adapter_model.*"):   # model state: the owner's only
            weights.chmod(0o600)
    return base_dir.resolve()
