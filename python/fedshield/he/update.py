"""EncryptedUpdate: one client's encrypted LoRA update (or an aggregate) on the wire.

Only the CKKS residues travel (bit-packed to bit_length(q) bits); every other byte of an
OpenFHE ciphertext is identical across fresh ciphertexts of a context and is rebuilt by the
key holders from their context's template. Seeded updates carry c0 and a 32-byte seed per
summed client instead of c0 and c1 (fedshield.he.seeded). See csrc/wire.hpp for the byte
layout (version 3; version-2 updates still parse).
"""

from __future__ import annotations

import hashlib

from .. import native

KIND_CLIENT = 1
KIND_AGGREGATE = 2
# Wire codes of CKKSParams.packing (csrc/wire.hpp).
PACKING_CODE = {"complex": 1, "real": 2}


class EncryptedUpdate:
    """Validated update bytes plus their parsed header. Immutable."""

    __slots__ = ("_data", "_header", "_digest")

    def __init__(self, data: bytes, header: dict) -> None:
        self._data = data
        self._header = header
        self._digest = None

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> "EncryptedUpdate":
        """Parses and validates every byte; raises fs.InvalidUpdate on malformed input."""
        data = bytes(data)
        return cls(data, native.parse_update(data))

    def to_bytes(self) -> bytes:
        return self._data

    @property
    def digest(self) -> str:
        """Hex SHA-256 of these bytes (domain "fedshield-aggregate-v1"): what a partial
        decryption names as the aggregate it decrypts, and a guard as the one it admitted.
        Hashed once per object (the bytes never change): a party that checks, partially
        decrypts and fuses one aggregate object hashes it once."""
        if self._digest is None:
            h = hashlib.sha256(b"fedshield-aggregate-v1")
            h.update(self._data)  # not prefix + bytes: that copies the whole aggregate
            self._digest = h.hexdigest()
        return self._digest

    @property
    def header(self) -> dict:
        return dict(self._header)

    @property
    def round(self) -> int:
        return self._header["round"]

    @property
    def n_summed(self) -> int:
        """Client updates folded into this one (1 for a client's own update)."""
        return self._header["n_summed"]

    @property
    def is_aggregate(self) -> bool:
        return self._header["kind"] == KIND_AGGREGATE

    @property
    def context_fingerprint(self) -> bytes:
        return self._header["context_fp"]

    @property
    def layout_fingerprint(self) -> bytes:
        return self._header["layout_fp"]

    @property
    def mask_fingerprint(self) -> bytes:
        return self._header["mask_fp"]

    @property
    def n_values(self) -> int:
        """Real values carried: kept LoRA values plus the weight."""
        return self._header["n_values"]

    @property
    def n_ciphertexts(self) -> int:
        return self._header["n_ciphertexts"]

    @property
    def is_seeded(self) -> bool:
        """Only c0 travels; c1 is the sum of the expansions of ``seeds`` (fedshield.he.seeded)."""
        return self._header["elements"] == 1

    @property
    def seeds(self) -> tuple[bytes, ...]:
        """The 32-byte seed of every client update summed in (seeded updates; else empty)."""
        return self._header["seeds"]

    @property
    def nbytes(self) -> int:
        return len(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        kind = "aggregate" if self.is_aggregate else "client update"
        return (f"EncryptedUpdate({kind}, round={self.round}, n_summed={self.n_summed}, "
                f"{self.n_ciphertexts} ciphertexts, {self.nbytes} bytes)")
