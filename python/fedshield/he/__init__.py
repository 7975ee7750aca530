"""CKKS engine over the openfhe module (loaded lazily; see backend.py)."""

from .context import Context, load_context
from .keys import SharedKeys, keygen_shared
from .params import CKKSParams

__all__ = ["CKKSParams", "Context", "SharedKeys", "keygen_shared", "load_context"]
