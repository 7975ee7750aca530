"""fedshield: privacy-preserving federated LoRA fine-tuning with CKKS (FedShield-LLM).

The server-side names (aggregate, load_context, EncryptedUpdate, Layout) never import openfhe.
"""

from .aggregate import aggregate
from .crypto_ops import DEFAULT_WEIGHT_BOUND, decrypt_update, encrypt_update
from .errors import (DataError, FedShieldError, HeadroomError, IncompatibleUpdate, InvalidUpdate,
                     KeyMaterialError, NotEnoughShares, ParameterError, UnsupportedPlatform)
from .he import (CKKSParams, Context, SharedKeys, combine_partials, keygen_shared,
                 keygen_threshold, load_context, partial_decrypt)
from .he import threshold
from .importance import ImportanceResult, importance_mask
from .layout import Layout, TensorSpec
from .update import EncryptedUpdate

__version__ = "0.1.0"

__all__ = [
    "CKKSParams", "Context", "DataError", "DEFAULT_WEIGHT_BOUND", "EncryptedUpdate",
    "FedShieldError",
    "HeadroomError", "ImportanceResult", "IncompatibleUpdate", "InvalidUpdate",
    "KeyMaterialError", "Layout", "NotEnoughShares", "ParameterError", "SharedKeys",
    "TensorSpec", "UnsupportedPlatform", "aggregate", "combine_partials", "decrypt_update",
    "encrypt_update", "importance_mask", "keygen_shared", "keygen_threshold", "load_context",
    "partial_decrypt", "threshold",
]
