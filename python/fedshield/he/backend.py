"""Everything that touches the openfhe module. openfhe itself loads on the first call of
openfhe() (key holders only): importing this module does not load it, so the server path never
does."""

from __future__ import annotations

import sys
from functools import lru_cache

import numpy as np

from ..base.errors import KeyMaterialError, ParameterError, UnsupportedPlatform
from .params import CKKSParams


@lru_cache(maxsize=1)
def openfhe():
    """The openfhe module, or a clear error naming the interpreters its wheels support."""
    try:
        import openfhe as module  # noqa: PLC0415 - deliberately lazy
    except ImportError as exc:
        version = ".".join(map(str, sys.version_info[:2]))
        raise UnsupportedPlatform(
            f"cannot import openfhe on Python {version} ({exc}). The openfhe wheels work on "
            "CPython 3.10 and on CPython 3.12 (Ubuntu 24.04-era systems): create the venv with "
            "python3.10, e.g. `make test` picks it for you.") from exc
    return module


_SECURITY = {128: "HEStd_128_classic", 192: "HEStd_192_classic", 256: "HEStd_256_classic"}


def make_crypto_context(params: CKKSParams):
    """A CKKS crypto context whose ciphertexts are only ever added, never multiplied: depth 0
    (one RNS tower), or with noise flooding params.n_towers towers (depth n_towers - 1, used
    only for the modulus: fresh ciphertexts stay at level 0)."""
    o = openfhe()
    p = o.CCParamsCKKSRNS()
    p.SetMultiplicativeDepth(params.n_towers - 1)
    p.SetScalingModSize(params.scale_bits)
    p.SetFirstModSize(params.first_mod_bits)
    p.SetRingDim(params.ring_dim)
    p.SetBatchSize(params.slots)
    p.SetScalingTechnique(o.FIXEDMANUAL)
    p.SetSecurityLevel(getattr(o, _SECURITY[params.security_bits]))
    # COMPLEX: the imaginary parts carry data (two reals per slot), so decryption must not
    # treat them as noise.
    p.SetCKKSDataType(o.COMPLEX)
    try:
        cc = o.GenCryptoContext(p)
    except RuntimeError as exc:
        raise ParameterError(f"OpenFHE rejected {params}: {exc}") from exc
    # GenCryptoContext hands back one shared object per parameter set, and its serialization
    # lists the enabled features: enabling every feature any fedshield code enables
    # (MULTIPARTY for threshold keys, LEVELEDSHE for the bench's OpenFHE baseline; each adds
    # operations and changes nothing for encryption) makes the bytes, hence the context
    # fingerprint, the same on every machine whatever else its process made before.
    for feature in (o.PKE, o.MULTIPARTY, o.LEVELEDSHE):
        cc.Enable(feature)
    return cc


def enable_multiparty(cc) -> None:
    """Threshold mode's extra OpenFHE feature (make_crypto_context enables it already; a crypto
    context loaded from a key file of an earlier release may lack it)."""
    o = openfhe()
    cc.Enable(o.MULTIPARTY)


def modulus_of(cc) -> int:
    # GetModulus() is a float in the binding; the element parameters give the exact integer.
    return int(cc.GetElementParams().GetModulus())


def moduli_of(cc, ciphertext: bytes) -> tuple[int, ...]:
    """The RNS tower moduli q_0..q_{T-1} in the order OpenFHE serializes them.

    The binding gives only their product Q (and q_0): the towers are the 64-bit words of a
    serialized ciphertext of cc that divide Q, ordered by first appearance (each tower's
    parameters precede its residues); their product must be Q exactly.
    """
    big_q = modulus_of(cc)
    q0 = int(cc.GetModulusCKKS())
    if q0 == big_q:
        return (big_q,)
    # Every tower's parameters are written before the first residue array: the head suffices.
    head = ciphertext[:4096]
    seen, found = set(), []
    for at in range(len(head) - 7):
        w = int.from_bytes(head[at:at + 8], "little")
        if w > 2 and w not in seen and big_q % w == 0 and w != big_q:
            seen.add(w)
            found.append((at, w))
    moduli = tuple(w for _, w in sorted(found))
    product = 1
    for q in moduli:
        product *= q
    if product != big_q or moduli[0] != q0:
        raise ParameterError(f"cannot read the RNS towers of this context (found {moduli})")
    return moduli


def serialize(obj) -> bytes:
    o = openfhe()
    return bytes(o.Serialize(obj, o.BINARY))


# OpenFHE names every key with a random 32-character tag, the only part of a key's serialization
# that its context and residues do not fix. fedshield's keys all carry this one, so a key
# rebuilt from its residues on another machine serializes to the bytes its maker's did.
KEY_TAG = "fedshield-key-v1-0000000000000000"[:32]


def serialize_key(key) -> bytes:
    """A public or secret key serialized under fedshield's fixed key tag (sets it on ``key``)."""
    key.SetKeyTag(KEY_TAG)
    return serialize(key)


def load_crypto_context(blob: bytes):
    o = openfhe()
    try:
        return o.DeserializeCryptoContextString(blob, o.BINARY)
    except Exception as exc:  # the binding raises RuntimeError or a cereal error
        raise KeyMaterialError(f"cannot load the OpenFHE crypto context: {exc}") from exc


def load_public_key(blob: bytes):
    o = openfhe()
    try:
        return o.DeserializePublicKeyString(blob, o.BINARY)
    except Exception as exc:
        raise KeyMaterialError(f"cannot load the public key: {exc}") from exc


def load_secret_key(blob: bytes):
    o = openfhe()
    try:
        return o.DeserializePrivateKeyString(blob, o.BINARY)
    except Exception as exc:
        raise KeyMaterialError(f"cannot load the secret key: {exc}") from exc


def encrypt_buffer(cc, key, buffer: np.ndarray, params: CKKSParams) -> list[bytes]:
    """Encrypts a float64 buffer of n_ciphertexts * values_per_ciphertext reals, with the
    public key or the secret key (OpenFHE's Encrypt takes either)."""
    o = openfhe()
    per_ct = params.values_per_ciphertext
    assert buffer.dtype == np.float64 and buffer.size % per_ct == 0
    slots = buffer.view(np.complex128) if params.packing == "complex" else buffer
    n_slots = params.slots
    out = []
    for i in range(buffer.size // per_ct):
        chunk = slots[i * n_slots:(i + 1) * n_slots]
        if params.packing == "real":
            chunk = chunk.astype(np.complex128)
        pt = cc.MakeCKKSPackedPlaintext(chunk)
        out.append(bytes(o.Serialize(cc.Encrypt(key, pt), o.BINARY)))
    return out


def load_rebuilt_ciphertext(blob: bytes):
    """A ciphertext rebuilt from the context's template and validated residues. The residues
    were checked natively, so a failure here means the context file's template is bad (e.g. a
    forged file with a recomputed checksum): a key-material error, not a raw OpenFHE one."""
    o = openfhe()
    try:
        return o.DeserializeCiphertextString(blob, o.BINARY)
    except Exception as exc:  # RuntimeError, MemoryError or a cereal error from the binding
        raise KeyMaterialError("the context's ciphertext template does not deserialize "
                               f"({type(exc).__name__}: {exc}); is the context file "
                               "genuine?") from exc


def decrypt_ciphertexts(cc, secret_key, cts: list[bytes], params: CKKSParams) -> np.ndarray:
    """Decrypts serialized ciphertexts into one float64 buffer of reals."""
    per_ct = params.values_per_ciphertext
    out = np.empty(len(cts) * per_ct, dtype=np.float64)
    for i, blob in enumerate(cts):
        ct = load_rebuilt_ciphertext(blob)
        pt = cc.Decrypt(secret_key, ct)
        pt.SetLength(params.slots)
        values = np.asarray(pt.GetCKKSPackedValue(), dtype=np.complex128)
        if params.packing == "complex":
            out[i * per_ct:(i + 1) * per_ct] = values.view(np.float64)
        else:
            out[i * per_ct:(i + 1) * per_ct] = values.real
    return out
