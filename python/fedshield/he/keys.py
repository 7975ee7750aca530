"""Key generation. Shared-key mode is the paper's: every client holds the one secret key."""

from __future__ import annotations

import numpy as np

from .. import _native
from . import backend
from .context import Context
from .flooding import check_precision
from .params import CKKSParams


def ciphertext_template(cc, public_key, params: CKKSParams) -> tuple[bytes, tuple, tuple]:
    """A fresh encryption of zeros, residues zeroed: every non-residue byte of our ciphertexts.
    Returns (template, layout, tower moduli)."""
    blob = backend.encrypt_buffer(cc, public_key,
                                  np.zeros(params.values_per_ciphertext, dtype=np.float64),
                                  params)[0]
    moduli = backend.moduli_of(cc, blob)
    layout = _native.locate_residues(blob, params.ring_dim, list(moduli))
    template = bytearray(blob)
    n, towers = params.ring_dim, len(moduli)
    for offset in layout[1 + towers:-1]:
        template[offset:offset + 8 * n] = bytes(8 * n)
    return bytes(template), layout, moduli


class SharedKeys:
    """One key pair shared by every client (paper mode; weaker, see docs/THREAT_MODEL.md)."""

    def __init__(self, params: CKKSParams, cc, key_pair) -> None:
        template, layout, moduli = ciphertext_template(cc, key_pair.publicKey, params)
        self._client = Context(
            params=params, modulus=moduli[0], moduli=moduli,
            crypto_context=backend.serialize(cc), public_key=backend.serialize(key_pair.publicKey),
            secret_key=backend.serialize(key_pair.secretKey), template=template, ct_layout=layout,
            role="client",
            live={"crypto_context": cc, "public_key": key_pair.publicKey,
                  "secret_key": key_pair.secretKey})

    def client_context(self) -> Context:
        """A context that encrypts and decrypts (holds the shared secret key)."""
        return self._client

    def server_context(self) -> Context:
        """A context with public material only: it aggregates but cannot decrypt."""
        return self._client.public()


def keygen_shared(params: CKKSParams | None = None) -> SharedKeys:
    """Generates one CKKS key pair for the whole federation (the paper's mode)."""
    params = (params or CKKSParams()).for_keys("shared")  # a request: the seeded profile
    check_precision(params, 1)
    cc = backend.make_crypto_context(params)
    return SharedKeys(params, cc, cc.KeyGen())
