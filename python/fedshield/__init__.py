"""fedshield: privacy-preserving federated LoRA fine-tuning with CKKS (FedShield-LLM).

``import fedshield`` loads neither torch nor openfhe: a keyless aggregation server uses
load_context, EncryptedUpdate.from_bytes and aggregate with numpy alone. The names that need
torch (Party, importance_mask, ImportanceResult) load it when first used.
"""

from importlib import import_module

from .base.errors import (AuthenticationError, ConcurrentUseError, DataError,
                     DecryptionBudgetExceeded, DecryptionRefused, FederationError, FedShieldError,
                     HeadroomError, IncompatibleUpdate, InvalidUpdate, KeyMaterialError,
                     KeyMessageRefused, KeySetupError, NotEnoughShares, ParameterError,
                     PrecisionError, StorageError,
                     UnsupportedPlatform)
from .he import (DEFAULT_TOLERANCE, CKKSParams, Context, EncryptedUpdate, Layout, SharedKeys,
                 TensorSpec, aggregate, combine_partials, decrypt_update, encrypt_update,
                 keygen_shared, keygen_threshold, load_context, partial_decrypt, threshold)

__version__ = "0.1.0"

# Public names whose modules need torch: imported on first use, so that the server-only
# install (no torch) can `import fedshield`.
_TORCH_NAMES = {
    "Party": "fedshield.fl.party",
    "importance_mask": "fedshield.pruning.mask",
    "ImportanceResult": "fedshield.pruning.mask",
}


def __getattr__(name: str):
    if name in _TORCH_NAMES:
        return getattr(import_module(_TORCH_NAMES[name]), name)
    raise AttributeError(f"module 'fedshield' has no attribute {name!r}")


__all__ = [
    "AuthenticationError", "CKKSParams", "ConcurrentUseError", "Context", "DataError",
    "DecryptionBudgetExceeded", "DecryptionRefused", "DEFAULT_TOLERANCE", "EncryptedUpdate",
    "FederationError", "FedShieldError",
    "HeadroomError", "ImportanceResult", "IncompatibleUpdate", "InvalidUpdate",
    "KeyMaterialError", "KeyMessageRefused", "KeySetupError", "Layout", "NotEnoughShares",
    "ParameterError", "Party",
    "PrecisionError", "SharedKeys", "StorageError", "TensorSpec", "UnsupportedPlatform",
    "aggregate", "combine_partials", "decrypt_update", "encrypt_update", "importance_mask",
    "keygen_shared", "keygen_threshold", "load_context", "partial_decrypt", "threshold",
]
