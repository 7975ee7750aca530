"""Key generation, and key material that crosses machines as residues only.

Shared-key mode is the paper's: every client holds the one secret key.

Every machine builds its OpenFHE crypto context itself from the parameters (:func:`local_crypto`;
OpenFHE picks the same primes and roots of unity for the same parameters, and the serialized
context is the same bytes everywhere). Key material from another machine (a party's b_i, the
joint public key, the shared secret key) travels as its residues, bit-packed and
checked natively (csrc/key_codec.cpp: exact size, every residue below its tower's modulus), and
is written into a key of the receiver's own context before OpenFHE sees it. OpenFHE never
deserializes a byte from outside: an edited byte of a serialized crypto context or key used to
crash the receiving process inside OpenFHE's deserializer.
"""

from __future__ import annotations

import json

import numpy as np

from .. import native
from ..base.errors import InvalidUpdate, KeyMaterialError
from . import backend
from .context import Context
from .encryption import public_key_ciphertext
from .flooding import check_precision
from .frames import DIGEST, frame, unframe
from .params import CKKSParams
from .wipe import wipe

SHARED_KEY_MAGIC = b"FSHLDSKM"   # the shared key's residues, sealed by party 0 to each client
PUBLIC, SECRET = 2, 1            # polynomials of a public key (b, a) and of a secret key (s)
_HEAD_LIMIT = 1 << 16            # a key message's JSON head: parameters, moduli, digests


def ciphertext_template(cc, public_key, params: CKKSParams) -> tuple[bytes, tuple, tuple]:
    """A fresh encryption of zeros, residues zeroed: every non-residue byte of our ciphertexts.
    Returns (template, layout, tower moduli)."""
    blob = backend.encrypt_buffer(cc, public_key,
                                  np.zeros(params.values_per_ciphertext, dtype=np.float64),
                                  params)[0]
    moduli = backend.moduli_of(cc, blob)
    layout = native.locate_residues(blob, params.ring_dim, list(moduli))
    template = bytearray(blob)
    n, towers = params.ring_dim, len(moduli)
    for offset in layout[1 + towers:-1]:
        template[offset:offset + 8 * n] = bytes(8 * n)
    return bytes(template), layout, moduli


class LocalCrypto:
    """An OpenFHE crypto context made on this machine from the parameters alone, its tower
    moduli, and templates of its keys (a key of its own, serialized, residues zeroed) on which
    key material from elsewhere is rebuilt: ``templates[PUBLIC or SECRET]`` is (template,
    layout), the same in every process that made the same parameters."""

    __slots__ = ("params", "cc", "cc_bytes", "moduli", "templates")

    def __init__(self, params: CKKSParams) -> None:
        self.params = params
        self.cc = backend.make_crypto_context(params)
        self.cc_bytes = backend.serialize(self.cc)
        throwaway = self.cc.KeyGen()
        zero = backend.encrypt_buffer(self.cc, throwaway.publicKey,
                                      np.zeros(params.values_per_ciphertext, dtype=np.float64),
                                      params)[0]
        self.moduli = backend.moduli_of(self.cc, zero)
        n, moduli = params.ring_dim, list(self.moduli)
        self.templates = {}
        for elements, key in ((PUBLIC, throwaway.publicKey), (SECRET, throwaway.secretKey)):
            blob = bytearray(backend.serialize_key(key))
            offsets = native.find_residue_arrays(blob, n, moduli, elements * len(moduli))
            for off in offsets:
                blob[off:off + 8 * n] = bytes(8 * n)
            self.templates[elements] = (bytes(blob), (n, *moduli, *offsets, len(blob)))

    def packed_bytes(self, elements: int) -> int:
        """Bytes of ``elements`` packed polynomials of this context."""
        return native.key_polys_bytes(self.params.ring_dim, list(self.moduli), elements)

    def pack(self, key, elements: int) -> bytearray:
        """An OpenFHE key of this context (PUBLIC or SECRET ``elements``) as its packed
        residues (a bytearray: wipe a secret key's when done)."""
        blob = bytearray(backend.serialize_key(key))
        try:
            return native.encode_key_polys(blob, self.params.ring_dim, list(self.moduli),
                                            elements)
        finally:
            wipe(blob)

    def check(self, packed, elements: int, what: str) -> None:
        """KeyMaterialError naming ``what`` unless ``packed`` is ``elements`` packed
        polynomials of this context (exact size, every residue below its modulus)."""
        try:
            wipe(native.decode_key_polys(packed, self.params.ring_dim, list(self.moduli),
                                          elements, what))
        except InvalidUpdate as exc:
            raise KeyMaterialError(str(exc)) from exc

    def _rebuild(self, packed, elements: int, what: str) -> bytearray:
        template, layout = self.templates[elements]
        try:
            return native.rebuild_key(packed, template, layout, elements, what)
        except InvalidUpdate as exc:
            raise KeyMaterialError(str(exc)) from exc

    def public_key(self, packed, what: str = "public key"):
        """(bytes, OpenFHE object) of a public key rebuilt from its packed residues."""
        blob = bytes(self._rebuild(packed, PUBLIC, what))
        return blob, backend.load_public_key(blob)

    def secret_key(self, packed, what: str = "secret key"):
        """(bytearray, OpenFHE object) of a secret key rebuilt from its packed residues (wipe
        the bytearray when done)."""
        blob = self._rebuild(packed, SECRET, what)
        return blob, backend.load_secret_key(bytes(blob))

    def context(self, public_key: bytes, pk, **extra) -> Context:
        """A Context of this crypto context under ``public_key`` (bytes and OpenFHE object)."""
        template, layout, moduli = ciphertext_template(self.cc, pk, self.params)
        if moduli != self.moduli:
            raise KeyMaterialError(f"the key's tower moduli {moduli} are not this context's "
                                   f"{self.moduli}")
        live = {"crypto_context": self.cc, "public_key": pk, **extra.pop("live", {})}
        return Context(params=self.params, modulus=moduli[0], moduli=moduli,
                       crypto_context=self.cc_bytes, public_key=public_key, template=template,
                       ct_layout=layout, live=live, **extra)


def local_crypto(params: CKKSParams) -> LocalCrypto:
    """This machine's crypto context for ``params`` (see :class:`LocalCrypto`)."""
    return LocalCrypto(params)


class SharedKeys:
    """One key pair shared by every client (paper mode; weaker, see docs/THREAT_MODEL.md)."""

    def __init__(self, local: LocalCrypto, key_pair) -> None:
        secret = backend.serialize_key(key_pair.secretKey)
        self._client = local.context(
            backend.serialize_key(key_pair.publicKey), key_pair.publicKey, secret_key=secret,
            role="client", live={"secret_key": key_pair.secretKey})

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
    local = local_crypto(params)
    return SharedKeys(local, local.cc.KeyGen())


# -- the shared key on the wire ----------------------------------------------------------------
def shared_key_material(client_ctx: Context) -> bytes:
    """The shared key pair as residues (public key, then secret key), for party 0 to seal to
    each client: no OpenFHE bytes, so the recipient's OpenFHE parses nothing of party 0's.
    Secret: seal it, and send it to its recipient only."""
    if not client_ctx.has_secret_key or client_ctx.is_party:
        raise KeyMaterialError("shared key material comes from a shared-key client context")
    n, moduli = client_ctx.params.ring_dim, list(client_ctx.moduli)
    public = native.encode_key_polys(client_ctx.public_key_bytes(), n, moduli, PUBLIC)
    secret = bytearray(client_ctx.secret_key_bytes())
    try:
        packed_secret = native.encode_key_polys(secret, n, moduli, SECRET)
    finally:
        wipe(secret)
    meta = {"params": json.loads(client_ctx.params.to_json()), "ring_dim": n, "moduli": moduli,
            "context_fp": client_ctx.fingerprint.hex()}
    try:
        return frame(SHARED_KEY_MAGIC, meta, [bytes(public), bytes(packed_secret)])
    finally:
        wipe(packed_secret)


def open_shared_key_material(material, params: CKKSParams) -> Context:
    """The client context of :func:`shared_key_material`, rebuilt on this machine's own crypto
    context for ``params`` (the receiver's, never the message's). KeyMaterialError for material
    of other parameters or moduli, malformed or out of range; the caller checks that the
    fingerprint is the one party 0 signed."""
    what = "shared key material"
    local = local_crypto(params)
    n, moduli = params.ring_dim, list(local.moduli)
    sizes = [local.packed_bytes(PUBLIC), local.packed_bytes(SECRET)]
    check_size(material, len(SHARED_KEY_MAGIC) + 6 + _HEAD_LIMIT + sum(sizes) + DIGEST, what)
    meta, sections = unframe(material, SHARED_KEY_MAGIC, what, KeyMaterialError)
    check_head(meta, {"params": json.loads(params.to_json()), "ring_dim": n, "moduli": moduli,
                      "sizes": sizes}, {"context_fp"}, what)
    fp = meta["context_fp"]
    if not (isinstance(fp, str) and len(fp) == 64 and all(c in "0123456789abcdef" for c in fp)):
        raise KeyMaterialError(f"malformed {what}: context_fp={fp!r:.80}")
    public, pk = local.public_key(sections[0], "shared public key")
    secret, sk = local.secret_key(sections[1], "shared secret key")
    try:
        ctx = local.context(public, pk, secret_key=secret, role="client",
                            live={"secret_key": sk})
    finally:
        wipe(secret)
    if ctx.fingerprint.hex() != fp:
        raise KeyMaterialError(f"the {what} rebuilds to context {ctx.fingerprint.hex()[:12]}..., "
                               f"not the {fp[:12]}... it names")
    check_key_pair(ctx)
    return ctx


def check_key_pair(ctx: Context) -> None:
    """KeyMaterialError unless the context's secret key is its public key's: the public key
    (b, a) = (-a * s + e, a) read as a ciphertext decrypts, with s, to e, which decodes to
    about 0; with any other key it decodes to noise of the modulus' size. Local: nothing of it
    leaves the machine."""
    cc, _, secret_key = ctx.openfhe_objects(need_secret=True)
    try:
        values = backend.decrypt_ciphertexts(cc, secret_key, [public_key_ciphertext(ctx)],
                                             ctx.params)
        largest = float(np.max(np.abs(values)))
    except RuntimeError:  # OpenFHE refuses a decryption whose noise is beyond decoding
        largest = float("inf")
    if not largest <= 1e-3:
        raise KeyMaterialError("the secret key is not the public key's (the public key does "
                               "not decrypt to zero with it)")


def check_size(blob, limit: int, what: str) -> None:
    """KeyMaterialError unless ``blob`` is bytes of at most ``limit`` bytes (what the
    parameters imply): checked before anything else reads it."""
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise KeyMaterialError(f"{what}: expected bytes, got {type(blob).__name__}")
    if len(blob) > limit:
        raise KeyMaterialError(f"{what}: {len(blob)} bytes, more than the {limit} these "
                               "parameters allow")


def check_head(meta: dict, want: dict, free: set, what: str) -> None:
    """A message head must hold exactly the keys of ``want`` (with those values: the
    receiver's own) and ``free`` (checked by the caller)."""
    if set(meta) != set(want) | free:
        raise KeyMaterialError(f"malformed {what}: fields {sorted(meta)!r:.200}, expected "
                               f"{sorted(set(want) | free)}")
    for key, value in want.items():
        got = meta[key]
        if got != value or type(got) is not type(value):
            raise KeyMaterialError(f"{what} made for {key}={got!r:.120}, this party's is "
                                   f"{value!r:.120}")
