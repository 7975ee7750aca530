"""Tiny Llama base model and LoRA adapters with strict state exchange.

Only LoRA parameters travel between clients and server, so their names,
shapes and dtype must be stable and loading them must never half-succeed.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, Mapping, Tuple

import torch

from .atomic import replacing_directory
from .config import LoraConfig, ModelConfig
from .data.tokenize import build_tokenizer
from .errors import ParameterError, StorageError, UnsupportedPlatform

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


@dataclass(frozen=True)
class LoraSettings:
    """LoRA hyper-parameters; defaults follow the paper (r=32, alpha=64)."""

    r: int = 32
    alpha: float = 64
    dropout: float = 0.05
    target_modules: Tuple[str, ...] = ("q_proj", "v_proj")

    def __post_init__(self):
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"LoRA r must be an int >= 1, got {self.r!r}")
        if not self.alpha > 0:
            raise ValueError(f"LoRA alpha must be > 0, got {self.alpha!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        if isinstance(self.target_modules, str):
            # A bare string would be iterated per character; demand a sequence.
            raise ValueError(
                f"target_modules must be a sequence of names, got string {self.target_modules!r}"
            )
        targets = tuple(self.target_modules)
        if not targets or not all(isinstance(t, str) and t for t in targets):
            raise ValueError(f"target_modules must be non-empty names, got {self.target_modules!r}")
        object.__setattr__(self, "target_modules", targets)  # keep hashable


def attach_lora(model, settings: LoraSettings = LoraSettings(), seed: int = 0):
    """Wrap ``model`` in a CAUSAL_LM ``PeftModel`` (modifies ``model`` in place).

    LoRA A matrices are initialised under ``seed`` (B starts at zero, so the
    adapted model initially equals the base); the global RNG is left as found.
    """
    from peft import LoraConfig, TaskType, get_peft_model

    if not isinstance(settings, LoraSettings):
        raise ValueError(f"settings must be a LoraSettings, got {type(settings).__name__}")
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules),
        task_type=TaskType.CAUSAL_LM,
        bias="none",
        # GPT-2's Conv1D stores weights transposed; peft would flip this itself, with a warning
        fan_in_fan_out=getattr(getattr(model, "config", None), "model_type", "") == "gpt2",
    )
    with seeded_rng(seed):
        peft_model = get_peft_model(model, config)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    logger.debug("attached LoRA r=%d alpha=%s: %d trainable params",
                 settings.r, settings.alpha, trainable)
    return peft_model


# Name parts that wrappers insert between a peft model's own parameter names: FSDP1's flat
# wrapper, activation checkpointing, torch.compile.
_WRAPPER_PARTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def unwrap_peft(model) -> torch.nn.Module:
    """The peft model inside DDP, FSDP1, DataParallel or torch.compile wrappers (``.module``,
    ``._orig_mod``); FSDP2 (``fully_shard``) keeps the model itself. TypeError when there is no
    peft model inside."""
    inner = model
    for _ in range(16):
        if hasattr(inner, "peft_config"):
            return inner
        nested = getattr(inner, "_orig_mod", None)
        if nested is None:
            nested = getattr(inner, "module", None)
        if not isinstance(nested, torch.nn.Module):
            break
        inner = nested
    raise TypeError(f"expected a peft model (LoRA attached), possibly wrapped by DDP or FSDP, "
                    f"got {type(model).__name__}")


def _fsdp1_roots(model) -> list:
    if not torch.distributed.is_available():
        return []
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    return list(FSDP.fsdp_modules(model, root_only=True))


@contextlib.contextmanager
def _full_parameters(model, writeback: bool) -> Iterator[None]:
    """FSDP1 shards flat parameters: gather every rank's full parameters for the block (a
    collective: every rank enters it)."""
    roots = _fsdp1_roots(model)
    if not roots:
        yield
        return
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with contextlib.ExitStack() as stack:
        for root in roots:
            stack.enter_context(FSDP.summon_full_params(root, writeback=writeback))
        yield


def _lora_parameters(peft_model) -> Dict[str, torch.nn.Parameter]:
    """peft state-dict name -> live LoRA parameter of the active adapter (peft's own rule:
    names holding ``lora_`` and the adapter name, which is then dropped from them)."""
    adapter = peft_model.active_adapter
    out = {}
    for name, param in peft_model.named_parameters():
        for part in _WRAPPER_PARTS:
            name = name.replace(part, "")
        if "lora_" in name and adapter in name:
            out[name.replace(f".{adapter}", "")] = param
    return out


def _is_dtensor(t: torch.Tensor) -> bool:
    return type(t).__name__ == "DTensor" and hasattr(t, "full_tensor")


def get_lora_state(model) -> Dict[str, torch.Tensor]:
    """LoRA parameters as detached, cloned fp32 CPU tensors, full size on every rank.

    ``model``: a peft model, possibly wrapped by DDP, FSDP1 or torch.compile, or sharded by
    FSDP2; a sharded model's parameters are gathered (a collective: every rank calls this).
    Names are those of ``peft.get_peft_model_state_dict`` (adapter name stripped), e.g.
    ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``. Cloning matters: the
    parameters are live, so a later optimiser step would otherwise change a "snapshot".
    """
    peft_model = unwrap_peft(model)
    out = {}
    with _full_parameters(model, writeback=False):
        params = _lora_parameters(peft_model)
        for name in sorted(params):
            t = params[name].detach()
            if _is_dtensor(t):
                t = t.full_tensor()
            out[name] = t.to(device="cpu", dtype=torch.float32).clone()
    return out


def set_lora_state(model, state: Mapping[str, torch.Tensor]) -> None:
    """Load LoRA parameters, requiring exactly the model's names and shapes.

    Every rank of a DDP or FSDP model calls it with the same state: each writes its own copy
    (DDP) or its own shard (FSDP). peft's ``set_peft_model_state_dict`` only reports unexpected
    keys and would leave missing ones at their old values, which in FL means a client silently
    training on a mix of rounds; so every mismatch raises ``ValueError``, before anything is
    written.
    """
    peft_model = unwrap_peft(model)
    with _full_parameters(model, writeback=True):
        params = _lora_parameters(peft_model)
        missing = sorted(set(params) - set(state))
        unexpected = sorted(set(state) - set(params))
        if missing or unexpected:
            raise ValueError(f"LoRA state keys do not match the model: missing={missing}, "
                             f"unexpected={unexpected}")
        bad_type = sorted(k for k, v in state.items() if not isinstance(v, torch.Tensor))
        if bad_type:
            raise ValueError(f"LoRA state values must be tensors; not tensors: {bad_type}")
        mismatched = [f"{k}: got {tuple(state[k].shape)}, expected {tuple(params[k].shape)}"
                      for k in sorted(params) if tuple(state[k].shape) != tuple(params[k].shape)]
        if mismatched:
            raise ValueError("LoRA state shape mismatch: " + "; ".join(mismatched))
        with torch.no_grad():
            for name in sorted(params):
                param = params[name]
                if _is_dtensor(param):
                    from torch.distributed.tensor import distribute_tensor

                    local = param.to_local()
                    value = state[name].detach().to(device=local.device, dtype=local.dtype)
                    # src_data_rank=None: each rank cuts its own shard, no communication
                    shard = distribute_tensor(value, param.device_mesh, param.placements,
                                              src_data_rank=None).to_local()
                    local.copy_(shard)
                else:
                    param.copy_(state[name].detach().to(device=param.device, dtype=param.dtype))


# LoRA targets per architecture (HF ``config.model_type``): the paper's q/v projections,
# which GPT-2 fuses into one ``c_attn`` Conv1D.
DEFAULT_LORA_TARGETS: Dict[str, Tuple[str, ...]] = {
    "llama": ("q_proj", "v_proj"),
    "mistral": ("q_proj", "v_proj"),
    "mixtral": ("q_proj", "v_proj"),
    "qwen2": ("q_proj", "v_proj"),
    "qwen3": ("q_proj", "v_proj"),
    "gemma": ("q_proj", "v_proj"),
    "phi3": ("qkv_proj",),
    "gpt2": ("c_attn",),
    "gpt_neox": ("query_key_value",),
    "falcon": ("query_key_value",),
}

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


def lora_targets_for(model_type: str, override: str = "") -> Tuple[str, ...]:
    """``override`` ("q_proj,v_proj") if given, else the default for ``model_type``."""
    if override:
        return tuple(t.strip() for t in override.split(",") if t.strip())
    if model_type not in DEFAULT_LORA_TARGETS:
        raise ParameterError(f"no default LoRA targets for model_type={model_type!r} (known: "
                             f"{sorted(DEFAULT_LORA_TARGETS)}); pass --lora-targets")
    return DEFAULT_LORA_TARGETS[model_type]


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


def _base_model(model_cfg: ModelConfig, seed: int, tokenizer, max_len: int):
    if model_cfg.name == "tiny":
        base = build_tiny_llama(len(tokenizer), seed=seed, init_std=TINY_INIT_STD)
        if model_cfg.dtype == "bf16":
            base.to(torch.bfloat16)
        return base, "llama"
    base = load_local_model(model_cfg.name, dtype=model_cfg.dtype, vocab_size=len(tokenizer),
                            max_len=max_len, quantize=model_cfg.quantize)
    return base, base.config.model_type


def build_lora_model(model_cfg: ModelConfig, lora_cfg: LoraConfig, *, seed: int, tokenizer,
                     max_len: int):
    """The run's base model with LoRA attached (A initialised under ``seed``, so every site
    starts from the same adapter), placed on its device and ready to train."""
    quantized = model_cfg.quantize != "none"
    device = torch.device("cuda") if quantized else resolve_device(model_cfg.device)
    base, model_type = _base_model(model_cfg, seed, tokenizer, max_len)
    base = prepare_for_training(base, grad_checkpointing=model_cfg.grad_checkpointing,
                                quantized=quantized)
    targets = lora_targets_for(model_type, lora_cfg.targets)
    settings = LoraSettings(r=lora_cfg.r, alpha=lora_cfg.alpha, dropout=lora_cfg.dropout,
                            target_modules=targets)
    try:
        model = attach_lora(base, settings, seed=seed)
    except ValueError as exc:  # peft: a target module the model does not have
        raise ParameterError(f"LoRA targets {list(targets)} on --model {model_cfg.name!r}: "
                             f"{exc}") from exc
    if not quantized:  # bitsandbytes placed the quantized model already
        model.to(device)
    return model


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
