"""LoRA adapters on a base model, with strict state exchange.

Only LoRA parameters travel between clients and server, so their names, shapes and dtype must be
stable and loading them must never half-succeed.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Dict, Iterator, Mapping, Tuple

import torch

from ..base.errors import ParameterError
from ..config import LoraConfig, ModelConfig
from .base_model import base_model_for, prepare_for_training, resolve_device, seeded_rng

logger = logging.getLogger("fedshield")


def attach_lora(model, lora: LoraConfig = LoraConfig(), seed: int = 0, *,
                targets: Tuple[str, ...] = ("q_proj", "v_proj")):
    """Wrap ``model`` in a CAUSAL_LM ``PeftModel`` (modifies ``model`` in place).

    ``targets`` are the modules LoRA wraps when ``lora.targets`` names none. LoRA A matrices are
    initialised under ``seed`` (B starts at zero, so the adapted model initially equals the
    base); the global RNG is left as found.
    """
    from peft import LoraConfig as PeftLoraConfig, TaskType, get_peft_model  # noqa: PLC0415

    if not isinstance(lora, LoraConfig):
        raise ParameterError(f"lora must be a fedshield LoraConfig, got {type(lora).__name__}")
    targets = tuple(lora.target_list) or tuple(targets)
    config = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(targets),
        task_type=TaskType.CAUSAL_LM,
        bias="none",
        # GPT-2's Conv1D stores weights transposed; peft would flip this itself, with a warning
        fan_in_fan_out=getattr(getattr(model, "config", None), "model_type", "") == "gpt2",
    )
    with seeded_rng(seed):
        peft_model = get_peft_model(model, config)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    logger.debug("attached LoRA r=%d alpha=%s: %d trainable params",
                 lora.r, lora.alpha, trainable)
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


def lora_targets_for(model_type: str, override: str = "") -> Tuple[str, ...]:
    """``override`` ("q_proj,v_proj") if given, else the default for ``model_type``."""
    if override:
        return tuple(t.strip() for t in override.split(",") if t.strip())
    if model_type not in DEFAULT_LORA_TARGETS:
        raise ParameterError(f"no default LoRA targets for model_type={model_type!r} (known: "
                             f"{sorted(DEFAULT_LORA_TARGETS)}); pass --lora-targets")
    return DEFAULT_LORA_TARGETS[model_type]


def build_lora_model(model_cfg: ModelConfig, lora_cfg: LoraConfig, *, seed: int, tokenizer,
                     max_len: int):
    """The run's base model with LoRA attached (A initialised under ``seed``, so every site
    starts from the same adapter), placed on its device and ready to train."""
    quantized = model_cfg.quantize != "none"
    device = torch.device("cuda") if quantized else resolve_device(model_cfg.device)
    base, model_type = base_model_for(model_cfg, seed, tokenizer, max_len)
    base = prepare_for_training(base, grad_checkpointing=model_cfg.grad_checkpointing,
                                quantized=quantized)
    targets = lora_targets_for(model_type, lora_cfg.targets)
    try:
        model = attach_lora(base, lora_cfg, seed=seed, targets=targets)
    except ValueError as exc:  # peft: a target module the model does not have
        raise ParameterError(f"LoRA targets {list(targets)} on --model {model_cfg.name!r}: "
                             f"{exc}") from exc
    if not quantized:  # bitsandbytes placed the quantized model already
        model.to(device)
    return model
