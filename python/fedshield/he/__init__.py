"""CKKS engine over the openfhe module (loaded lazily; see backend.py)."""

from .context import Context, load_context
from .keys import SharedKeys, keygen_shared
from .params import CKKSParams
from .threshold import combine_partials, keygen_threshold, partial_decrypt

__all__ = ["CKKSParams", "Context", "SharedKeys", "combine_partials", "keygen_shared",
           "keygen_threshold", "load_context", "partial_decrypt"]
