"""Key-holding contexts and their serialization.

A context owns every key. Its bytes leave the secret key out unless asked, and a context
without the secret key loads and aggregates without importing openfhe.
"""

from __future__ import annotations

import hashlib
import json
import struct
from typing import Optional

from ..errors import KeyMaterialError, ParameterError
from .params import CKKSParams

_MAGIC = b"FSHLDCTX"
_VERSION = 1
_DIGEST = 32


def context_fingerprint(params: CKKSParams, modulus: int, public_key: bytes) -> bytes:
    """Binds an update to its parameters and public key: a foreign update cannot pass for ours."""
    h = hashlib.sha256(b"fedshield-context-v1")
    h.update(params.fingerprint())
    h.update(modulus.to_bytes(8, "little"))
    h.update(hashlib.sha256(public_key).digest())
    return h.digest()


class Context:
    """CKKS material of one participant: parameters, public key, and maybe the secret key.

    Build one with :func:`fedshield.keygen_shared` or :func:`fedshield.load_context`.
    """

    def __init__(self, *, params: CKKSParams, modulus: int, crypto_context: bytes,
                 public_key: bytes, template: bytes, ct_layout: tuple,
                 secret_key: Optional[bytes] = None, role: str = "client",
                 live: Optional[dict] = None) -> None:
        self.params = params
        self.modulus = int(modulus)
        self.role = role
        self._crypto_context = crypto_context
        self._public_key = public_key
        self._secret_key = secret_key
        self._template = template
        self._ct_layout = tuple(int(v) for v in ct_layout)
        self.fingerprint = context_fingerprint(params, self.modulus, public_key)
        # openfhe objects, built on first use (never on the server path)
        self._live = dict(live or {})

    @property
    def has_secret_key(self) -> bool:
        return self._secret_key is not None

    @property
    def ciphertext_template(self) -> tuple[bytes, tuple]:
        """Serialized ciphertext with zeroed residues and where its residues sit."""
        return self._template, self._ct_layout

    def public(self) -> "Context":
        """The same context without the secret key (what a server gets)."""
        return Context(params=self.params, modulus=self.modulus,
                       crypto_context=self._crypto_context, public_key=self._public_key,
                       template=self._template, ct_layout=self._ct_layout, role="server",
                       live={k: self._live[k] for k in ("crypto_context", "public_key")
                             if k in self._live})

    def __repr__(self) -> str:
        return (f"Context(role={self.role!r}, ring_dim={self.params.ring_dim}, "
                f"has_secret_key={self.has_secret_key}, "
                f"fingerprint={self.fingerprint.hex()[:12]}...)")

    # -- openfhe objects (client side only) --------------------------------------------
    def _openfhe(self, need_secret: bool = False):
        """(crypto_context, public_key, secret_key or None) as live openfhe objects."""
        if need_secret and self._secret_key is None:
            raise KeyMaterialError(
                f"this {self.role} context holds no secret key: it can encrypt and aggregate "
                "but not decrypt")
        from . import backend  # noqa: PLC0415 - openfhe stays unloaded on the server path

        if "crypto_context" not in self._live:
            self._live["crypto_context"] = backend.load_crypto_context(self._crypto_context)
        if "public_key" not in self._live:
            self._live["public_key"] = backend.load_public_key(self._public_key)
        if need_secret and "secret_key" not in self._live:
            self._live["secret_key"] = backend.load_secret_key(self._secret_key)
        return (self._live["crypto_context"], self._live["public_key"],
                self._live.get("secret_key"))

    def _pool(self, workers: int, need_secret: bool):
        """A CryptoPool for this context (started once, reused; None when workers <= 1)."""
        if workers <= 1:
            return None
        key = ("pool", workers, need_secret)
        if key not in self._live or self._live[key].broken:
            from .workers import CryptoPool  # noqa: PLC0415

            blob = self.to_bytes(include_secret=need_secret)
            self._live[key] = CryptoPool(blob, self.params, workers)
        return self._live[key]

    # -- serialization -------------------------------------------------------------------
    def to_bytes(self, include_secret: bool = False) -> bytes:
        """Serializes the context; the secret key only with ``include_secret=True``."""
        if include_secret and self._secret_key is None:
            raise KeyMaterialError("include_secret=True, but this context holds no secret key")
        sections = [("crypto_context", self._crypto_context), ("public_key", self._public_key),
                    ("template", self._template)]
        if include_secret:
            sections.append(("secret_key", self._secret_key))
        meta = {
            "params": json.loads(self.params.to_json()),
            "modulus": self.modulus,
            "fingerprint": self.fingerprint.hex(),
            "role": self.role if include_secret else "server",
            "ct_layout": list(self._ct_layout),
            "sections": [[name, len(blob)] for name, blob in sections],
        }
        head = json.dumps(meta, sort_keys=True).encode()
        body = b"".join([_MAGIC, struct.pack("<HI", _VERSION, len(head)), head,
                         *(blob for _, blob in sections)])
        return body + hashlib.sha256(body).digest()


def load_context(blob: bytes) -> Context:
    """Loads a context from :meth:`Context.to_bytes`; raises KeyMaterialError if malformed.

    Needs no openfhe: a public context loads and aggregates anywhere.
    """
    blob = bytes(blob)
    fixed = len(_MAGIC) + 6
    if len(blob) < fixed + _DIGEST or blob[:len(_MAGIC)] != _MAGIC:
        raise KeyMaterialError("not a fedshield context (bad magic or too short)")
    body, digest = blob[:-_DIGEST], blob[-_DIGEST:]
    if hashlib.sha256(body).digest() != digest:
        raise KeyMaterialError("context bytes are corrupted (digest mismatch)")
    version, head_len = struct.unpack_from("<HI", blob, len(_MAGIC))
    if version != _VERSION:
        raise KeyMaterialError(f"context format version {version} is not supported "
                               f"(expected {_VERSION})")
    try:
        meta = json.loads(body[fixed:fixed + head_len])
        params = CKKSParams.from_dict(meta["params"])
        sections, at = {}, fixed + head_len
        for name, size in meta["sections"]:
            # negative sizes would walk `at` backwards and still let the total add up
            if not (isinstance(size, int) and size >= 0):
                raise ValueError(f"section {name!r} has size {size!r}")
            sections[name] = body[at:at + size]
            at += size
        if at != len(body):
            raise ValueError("section sizes do not add up")
        ctx = Context(params=params, modulus=int(meta["modulus"]),
                      crypto_context=sections["crypto_context"],
                      public_key=sections["public_key"], template=sections["template"],
                      ct_layout=tuple(meta["ct_layout"]), secret_key=sections.get("secret_key"),
                      role=str(meta["role"]))
        _check_ciphertext_layout(ctx)
        # inside the try: a missing "fingerprint" key is a malformed context, not a KeyError
        fingerprint_ok = ctx.fingerprint.hex() == meta["fingerprint"]
    except (KeyError, ValueError, TypeError, ParameterError,
            OverflowError, RecursionError) as exc:  # int(inf), deeply nested JSON
        raise KeyMaterialError(f"malformed context: {exc}") from exc
    if not fingerprint_ok:
        raise KeyMaterialError("context fingerprint does not match its public key")
    return ctx


def _check_ciphertext_layout(ctx: Context) -> None:
    """The template layout must describe this context's ciphertexts: the native code copies
    residues through these offsets (it re-checks the bounds itself too)."""
    layout = ctx._ct_layout
    n = ctx.params.ring_dim
    if len(layout) != 5:
        raise ValueError(f"ct_layout has {len(layout)} fields, expected 5")
    ring_dim, modulus, c0, c1, total = layout
    if ring_dim != n or modulus != ctx.modulus or total != len(ctx._template):
        raise ValueError(f"ct_layout {layout} does not match ring_dim {n}, the modulus or the "
                         f"{len(ctx._template)}-byte template")
    if not (8 <= c0 and c0 + 8 * n + 8 <= c1 and c1 + 8 * n <= total):
        raise ValueError(f"ct_layout offsets ({c0}, {c1}) do not fit the template")
    if not (3 <= ctx.modulus < 2**62 and ctx.modulus % 2 == 1):  # what the wire format takes
        raise ValueError(f"modulus {ctx.modulus} is not an odd modulus in [3, 2**62)")
