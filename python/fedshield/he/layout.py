"""LoRA state <-> a fixed order of named tensors, identical on every participant.

Works on torch tensors and numpy arrays alike, without importing torch (fedshield.he.arrays).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from .. import native
from ..base.errors import IncompatibleUpdate
from .arrays import bool_flat, float32_flat, is_array_like, shape_of


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
    def from_state_dict(cls, state: Mapping) -> "Layout":
        """From name -> tensor (torch or numpy)."""
        specs = []
        for name, tensor in state.items():
            if not is_array_like(tensor):
                raise TypeError(f"state[{name!r}] is a {type(tensor).__name__}, expected a "
                                "tensor or a numpy array")
            shape = shape_of(tensor)
            if int(np.prod(shape, dtype=np.int64)) == 0:
                raise ValueError(f"state[{name!r}] is empty (shape {shape})")
            specs.append(TensorSpec(name, shape))
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

    def check_state(self, state: Mapping, what: str = "state") -> None:
        """Raises IncompatibleUpdate naming the first mismatching tensor."""
        missing = [n for n in self.names if n not in state]
        extra = [n for n in state if n not in set(self.names)]
        if missing or extra:
            raise IncompatibleUpdate(
                f"{what} does not match the layout: missing {missing[:3]}, unexpected {extra[:3]}")
        for spec in self.specs:
            shape = shape_of(state[spec.name])
            if shape != spec.shape:
                raise IncompatibleUpdate(
                    f"{what}[{spec.name!r}] has shape {shape}, the layout expects {spec.shape}")

    def flat_arrays(self, state: Mapping) -> list[np.ndarray]:
        """float32, C-contiguous numpy views (copies only where dtype/device/strides need it)."""
        self.check_state(state)
        return [float32_flat(state[s.name]) for s in self.specs]

    def mask_arrays(self, mask: Mapping | None) -> list[np.ndarray | None]:
        if mask is None:
            return [None] * len(self.specs)
        self.check_state(mask, "mask")
        return [bool_flat(mask[s.name], f"mask[{s.name!r}]") for s in self.specs]

    def kept_count(self, mask: Mapping | None) -> int:
        """LoRA values a mask keeps (all of them for no mask)."""
        if mask is None:
            return self.numel
        return int(sum(native.kept_counts(self.mask_arrays(mask))))

    def mask_fingerprint(self, mask: Mapping | None) -> bytes:
        """32 zero bytes for no mask; else a hash of the layout and every mask bit."""
        if mask is None:
            return bytes(32)
        h = hashlib.sha256(b"fedshield-mask-v1" + self.fingerprint)
        for arr in self.mask_arrays(mask):
            h.update(np.packbits(arr.astype(bool)).tobytes())
        return h.digest()
