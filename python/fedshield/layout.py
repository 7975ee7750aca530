"""LoRA state <-> a fixed order of named tensors, identical on every participant."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch

from . import _native
from .errors import IncompatibleUpdate


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1


class Layout:
    """Deterministic order (sorted names), shapes and a fingerprint of a LoRA state dict."""

    def __init__(self, specs: list[TensorSpec]) -> None:
        names = [s.name for s in specs]
        if not specs:
            raise ValueError("a Layout needs at least one tensor, got an empty state")
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate tensor names in layout: {names}")
        self.specs = tuple(sorted(specs, key=lambda s: s.name))
        self.fingerprint = hashlib.sha256(b"fedshield-layout-v1" + self.to_json().encode()).digest()

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor]) -> "Layout":
        specs = []
        for name, tensor in state.items():
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"state[{name!r}] is a {type(tensor).__name__}, expected a tensor")
            if tensor.numel() == 0:
                raise ValueError(f"state[{name!r}] is empty (shape {tuple(tensor.shape)})")
            specs.append(TensorSpec(name, tuple(int(d) for d in tensor.shape)))
        return cls(specs)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.specs]

    @property
    def numel(self) -> int:
        return sum(s.numel for s in self.specs)

    def __len__(self) -> int:
        return len(self.specs)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Layout) and other.fingerprint == self.fingerprint

    def __hash__(self) -> int:
        return hash(self.fingerprint)

    def __repr__(self) -> str:
        return f"Layout({len(self.specs)} tensors, {self.numel} values, {self.fingerprint.hex()[:12]}...)"

    def to_json(self) -> str:
        return json.dumps([[s.name, list(s.shape)] for s in self.specs])

    @classmethod
    def from_json(cls, text: str) -> "Layout":
        return cls([TensorSpec(name, tuple(shape)) for name, shape in json.loads(text)])

    def check_state(self, state: Mapping[str, torch.Tensor], what: str = "state") -> None:
        """Raises IncompatibleUpdate naming the first mismatching tensor."""
        missing = [n for n in self.names if n not in state]
        extra = [n for n in state if n not in set(self.names)]
        if missing or extra:
            raise IncompatibleUpdate(
                f"{what} does not match the layout: missing {missing[:3]}, unexpected {extra[:3]}")
        for spec in self.specs:
            shape = tuple(state[spec.name].shape)
            if shape != spec.shape:
                raise IncompatibleUpdate(
                    f"{what}[{spec.name!r}] has shape {shape}, the layout expects {spec.shape}")

    def flat_arrays(self, state: Mapping[str, torch.Tensor]) -> list[np.ndarray]:
        """float32, C-contiguous numpy views (copies only where dtype/device/strides need it)."""
        self.check_state(state)
        return [np.ascontiguousarray(
                    state[s.name].detach().to("cpu", torch.float32).numpy().reshape(-1))
                for s in self.specs]

    def mask_arrays(self, mask: Mapping[str, torch.Tensor] | None) -> list[np.ndarray | None]:
        if mask is None:
            return [None] * len(self.specs)
        self.check_state(mask, "mask")
        out = []
        for s in self.specs:
            m = mask[s.name]
            if m.dtype != torch.bool:
                raise TypeError(f"mask[{s.name!r}] has dtype {m.dtype}, expected torch.bool")
            out.append(np.ascontiguousarray(m.detach().cpu().numpy().reshape(-1)).view(np.uint8))
        return out

    def kept_count(self, mask: Mapping[str, torch.Tensor] | None) -> int:
        """LoRA values a mask keeps (all of them for no mask)."""
        if mask is None:
            return self.numel
        return int(sum(_native.kept_counts(self.mask_arrays(mask))))

    def mask_fingerprint(self, mask: Mapping[str, torch.Tensor] | None) -> bytes:
        """32 zero bytes for no mask; else a hash of the layout and every mask bit."""
        if mask is None:
            return bytes(32)
        h = hashlib.sha256(b"fedshield-mask-v1" + self.fingerprint)
        for arr in self.mask_arrays(mask):
            h.update(np.packbits(arr.astype(bool)).tobytes())
        return h.digest()
