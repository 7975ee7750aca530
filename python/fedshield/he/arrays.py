"""Tensors in, numpy out: the encryption layer reads torch tensors and numpy arrays alike
without importing torch, so the keyless server path never loads it.

Decrypted values go back to key holders as torch tensors (they train with torch); only
:func:`as_tensors` imports torch, and only a key holder calls it.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np


def is_array_like(value) -> bool:
    """A numpy array or a torch tensor (recognised by its methods, not by importing torch)."""
    return isinstance(value, np.ndarray) or (hasattr(value, "detach") and hasattr(value, "shape"))


def shape_of(value) -> tuple[int, ...]:
    return tuple(int(d) for d in value.shape)


def float32_flat(value) -> np.ndarray:
    """float32, C-contiguous, flattened (copies only where dtype, device or strides need it)."""
    if isinstance(value, np.ndarray):
        return np.ascontiguousarray(value, dtype=np.float32).reshape(-1)
    return np.ascontiguousarray(value.detach().cpu().float().numpy()).reshape(-1)


def bool_flat(value, what: str) -> np.ndarray:
    """A bool array or tensor as a flat uint8 view; TypeError for any other dtype."""
    arr = value if isinstance(value, np.ndarray) else value.detach().cpu().numpy()
    if arr.dtype != np.bool_:
        raise TypeError(f"{what} has dtype {value.dtype}, expected bool")
    return np.ascontiguousarray(arr).reshape(-1).view(np.uint8)


def as_tensors(arrays: Mapping[str, np.ndarray]) -> dict:
    """name -> torch tensor sharing each array's memory (key holders only)."""
    import torch  # noqa: PLC0415 - torch is a key holder's dependency, never the server's

    return {name: torch.from_numpy(arr) for name, arr in arrays.items()}
