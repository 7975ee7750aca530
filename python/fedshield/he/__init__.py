"""The encryption layer: CKKS parameters, keys (shared, threshold: collective key
generation), contexts, the layout of a LoRA state, encrypt/decrypt, partial decryptions, the
wire format and aggregation.

It also holds what authenticates threshold federations: the parties' long-term identities
(signatures, sealed messages, signed records) and each key holder's decryption budget.

It imports nothing from the rest of fedshield except the errors, the atomic file writer and
the native module. openfhe loads only when a key holder first needs it (backend.openfhe()),
torch only when decrypted values are handed back (arrays.as_tensors): the aggregation server's
path (load_context, EncryptedUpdate.from_bytes, aggregate, to_bytes) needs neither.
"""

from . import threshold
from .aggregate import aggregate
from .budget import DecryptionBudget
from .context import Context, load_context
from .encryption import DEFAULT_TOLERANCE, decrypt_update, encrypt_update
from .keys import SharedKeys, keygen_shared
from .layout import Layout, TensorSpec
from .params import CKKSParams
from .partial import PartialDecryption, aggregate_digest, combine_partials, partial_decrypt
from .threshold import keygen_threshold
from .update import EncryptedUpdate

__all__ = ["CKKSParams", "Context", "DEFAULT_TOLERANCE", "DecryptionBudget", "EncryptedUpdate",
           "Layout", "PartialDecryption", "SharedKeys",
           "TensorSpec", "aggregate", "aggregate_digest",
           "combine_partials", "decrypt_update", "encrypt_update", "keygen_shared",
           "keygen_threshold", "load_context", "partial_decrypt", "threshold"]
