"""Best-effort wiping of key material held in Python buffers.

Python gives no guarantee: the interpreter, numpy and OpenFHE may have made copies. What can be
done is to zero, in place, every mutable buffer fedshield owns before it drops it, so a key does
not linger in freed memory that is reused or dumped. (The native core wipes its own buffers with
explicit_bzero, csrc/secure_wipe.hpp, which the compiler may not elide.)
"""

from __future__ import annotations

import numpy as np


def wipe(buffer) -> None:
    """Zeroes a bytearray, writable memoryview or numpy array in place."""
    if isinstance(buffer, np.ndarray):
        buffer[...] = 0
        return
    view = memoryview(buffer)
    if view.readonly:
        raise TypeError(f"cannot wipe a read-only {type(buffer).__name__} in place")
    view.cast("B")[:] = bytes(view.nbytes)


__all__ = ["wipe"]
