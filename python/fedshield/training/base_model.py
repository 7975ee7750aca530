"""The base model: the offline tiny Llama, or a local Hugging Face directory, its tokenizer and
the device it trains on. No LoRA here (fedshield.training.lora)."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
from pathlib import Path
from typing import Iterator

import torch

from ..base.errors import ParameterError, UnsupportedPlatform
from ..config import ModelConfig
from ..data.tokenize import build_tokenizer

logger = logging.getLogger("fedshield")


@contextlib.contextmanager
def seeded_rng(seed: int) -> Iterator[None]:
    """Seed torch's global RNGs inside the block and restore them afterwards.

    ``torch.manual_seed`` also reseeds every CUDA device, so all of them are
    forked too; otherwise seeding for reproducibility would silently reset
    the caller's GPU RNG streams.
    """
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def build_tiny_llama(
    vocab_size: int,
    seed: int = 0,
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    intermediate: int = 128,
    max_positions: int = 256,
    pad_token_id: int = 0,
    bos_token_id: int = 1,
    eos_token_id: int = 2,
    init_std: float = 0.02,
):
    """Randomly initialised ``LlamaForCausalLM`` built from a config (no hub).

    Every client calling this with the same arguments gets bit-identical
    weights, which is what makes the base model a shared constant in FL.
    Special-token ids default to those of :func:`fedshield.data.tokenize.build_tokenizer`.

    ``init_std`` is Llama's ``initializer_range``. The HF default 0.02 leaves
    the frozen random lm_head so small that logits can only move by about
    +-1.3, which caps how far LoRA alone can lower the loss of an untrained
    base; ~0.1 gives adapters room to learn in demos.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    for name, value in (
        ("vocab_size", vocab_size),
        ("hidden_size", hidden_size),
        ("layers", layers),
        ("heads", heads),
        ("intermediate", intermediate),
        ("max_positions", max_positions),
    ):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if not init_std > 0:
        raise ValueError(f"init_std must be > 0, got {init_std}")
    if hidden_size % heads:
        raise ValueError(f"hidden_size={hidden_size} is not divisible by heads={heads}")
    for name, value in (("pad_token_id", pad_token_id), ("bos_token_id", bos_token_id),
                        ("eos_token_id", eos_token_id)):
        if not 0 <= value < vocab_size:
            raise ValueError(f"{name}={value} is outside the vocab (size {vocab_size})")

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_positions,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        tie_word_embeddings=False,
        initializer_range=init_std,
    )
    with seeded_rng(seed):  # same weights everywhere, caller's RNG untouched
        model = LlamaForCausalLM(config)
    model.to(torch.float32)
    model.eval()
    n_params = sum(p.numel() for p in model.parameters())
    logger.debug("built tiny llama: %d params, seed %d", n_params, seed)
    return model


_GENERIC_TOKENIZERS = ("PreTrainedTokenizerFast", "TokenizersBackend")

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _check_model_dir(path) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise ParameterError(f"--model {str(path)!r}: not 'tiny' and not a local directory")
    if not (path / "config.json").is_file():
        raise ParameterError(f"--model {str(path)!r}: no config.json; expected a Hugging Face "
                             "model directory (save_pretrained output)")
    return path


def load_local_tokenizer(path):
    """``AutoTokenizer`` from a local directory, with a pad token (the eos, if it had none).

    Reusing eos as pad adds no token, so the base model's vocabulary stays as saved.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast  # noqa: PLC0415

    path = _check_model_dir(path)
    try:
        declared = json.loads((path / "tokenizer_config.json").read_text()).get("tokenizer_class")
    except (OSError, ValueError):
        declared = None
    try:
        if declared in _GENERIC_TOKENIZERS:
            # transformers 5 would rebuild a generic tokenizer.json as the architecture's own
            # class (Qwen2's drops newlines from a char vocab); load it as saved instead.
            tok = PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
        else:
            tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ParameterError(f"--model {str(path)!r}: cannot load its tokenizer: {exc}") from exc
    if tok.eos_token_id is None:
        raise ParameterError(f"--model {str(path)!r}: the tokenizer has no eos token")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when a GPU is usable, else cpu; 'cuda' without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UnsupportedPlatform("device='cuda' but torch sees no CUDA GPU on this machine "
                                  f"(torch {torch.__version__}); use --device cpu or auto")
    if name not in ("cpu", "cuda"):
        raise ParameterError(f"device={name!r} is not one of ('auto', 'cpu', 'cuda')")
    return torch.device(name)


def _quantization_config(quantize: str, dtype: str):
    """A BitsAndBytesConfig for 8/4-bit loading; a clear error where it cannot work."""
    if quantize not in ("8bit", "4bit"):
        raise ParameterError(f"quantize={quantize!r} is not one of ('none', '8bit', '4bit')")
    if not torch.cuda.is_available():
        raise UnsupportedPlatform(f"quantize={quantize!r} needs bitsandbytes on a CUDA GPU; "
                                  "torch sees no GPU here. Load in bf16 or fp32 instead")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UnsupportedPlatform(f"quantize={quantize!r} needs the bitsandbytes package: "
                                  "pip install bitsandbytes")
    from transformers import BitsAndBytesConfig  # noqa: PLC0415

    if quantize == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=_DTYPES[dtype] if dtype == "bf16"
                              else torch.float32)


def prepare_for_training(model, *, grad_checkpointing: bool = False, quantized: bool = False):
    """Before LoRA is attached: k-bit preparation and/or activation checkpointing."""
    if quantized:
        from peft import prepare_model_for_kbit_training  # noqa: PLC0415

        return prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=grad_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    if grad_checkpointing:
        # Non-reentrant checkpointing works with frozen inputs (LoRA trains adapters only).
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model


def load_local_model(path, dtype: str = "fp32", vocab_size: int | None = None,
                     max_len: int | None = None, quantize: str = "none"):
    """A local Hugging Face causal LM (``AutoModelForCausalLM``, no hub), frozen-ready, in eval.

    ``vocab_size`` (the tokenizer's length) and ``max_len`` are checked against the model's
    config so a mismatch stops here instead of as an index error inside the forward pass.
    ``quantize`` '8bit'/'4bit' loads through bitsandbytes onto GPU 0.
    """
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    path = _check_model_dir(path)
    if dtype not in _DTYPES:
        raise ParameterError(f"dtype={dtype!r} is not one of {tuple(_DTYPES)}")
    extra = {}
    if quantize != "none":
        extra = {"quantization_config": _quantization_config(quantize, dtype),
                 "device_map": {"": 0}}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True,
                                                     dtype=_DTYPES[dtype], **extra)
    except (OSError, ValueError) as exc:
        raise ParameterError(f"--model {str(path)!r}: cannot load a causal LM: {exc}") from exc
    config = model.config
    n_vocab = model.get_input_embeddings().weight.shape[0]
    if vocab_size is not None and vocab_size > n_vocab:
        raise ParameterError(f"--model {str(path)!r}: its tokenizer has {vocab_size} tokens but "
                             f"the model's embedding only {n_vocab}")
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions",
                                                                            None)
    if max_len is not None and positions is not None and max_len > positions:
        raise ParameterError(f"max_len={max_len} is longer than --model {str(path)!r} allows "
                             f"({positions} positions)")
    model.eval()
    logger.debug("loaded %s (%s, %s): %d params", path, config.model_type, dtype,
                 sum(p.numel() for p in model.parameters()))
    return model


# A wider init of the random tiny base gives its frozen output layer enough reach that LoRA
# on q/v alone visibly lowers the loss in a few rounds (with 0.02 it barely moves).
TINY_INIT_STD = 0.1


def load_tokenizer(model_cfg: ModelConfig):
    """The tokenizer of the run's model: the offline character-level one for 'tiny', else the
    model directory's own."""
    if model_cfg.name == "tiny":
        return build_tokenizer()
    return load_local_tokenizer(model_cfg.name)


def base_model_for(model_cfg: ModelConfig, seed: int, tokenizer, max_len: int):
    """The run's base model (the tiny one rebuilt from ``seed``, else the local directory) and its
    model_type."""
    if model_cfg.name == "tiny":
        base = build_tiny_llama(len(tokenizer), seed=seed, init_std=TINY_INIT_STD)
        if model_cfg.dtype == "bf16":
            base.to(torch.bfloat16)
        return base, "llama"
    base = load_local_model(model_cfg.name, dtype=model_cfg.dtype, vocab_size=len(tokenizer),
                            max_len=max_len, quantize=model_cfg.quantize)
    return base, base.config.model_type
