"""CKKS parameters: a frozen, self-validating dataclass that needs no openfhe to exist."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

from ..errors import ParameterError

# Largest log2(Q*P) per ring dimension for a ternary secret, classical attacks, from the
# Homomorphic Encryption Standard (Albrecht et al., 2018), the same table OpenFHE enforces.
HE_STANDARD_MAX_LOGQ = {
    128: {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881, 65536: 1761,
          131072: 3524},
    192: {1024: 19, 2048: 37, 4096: 75, 8192: 152, 16384: 305, 32768: 611, 65536: 1220,
          131072: 2441},
    256: {1024: 14, 2048: 29, 4096: 58, 8192: 118, 16384: 237, 32768: 476, 65536: 956,
          131072: 1912},
}

# One machine word per residue: OpenFHE's native integers hold moduli of at most 60 bits.
MAX_MODULUS_BITS = 60
# Below this the CKKS encoding error swamps the fine-tuning signal.
MIN_SCALE_BITS = 30


@dataclass(frozen=True)
class CKKSParams:
    """CKKS parameters of a federation (depth 0: ciphertexts are only added).

    The modulus q is one prime of ``first_mod_bits`` bits; values are encoded at scale
    2**scale_bits. What lies between them is headroom for the sum of ``max_clients`` updates.
    """

    ring_dim: int = field(default=16384, metadata={"help": "ring dimension N (power of two); N/2 slots"})
    scale_bits: int = field(default=50, metadata={"help": "log2 of the CKKS scaling factor (precision)"})
    first_mod_bits: int = field(default=60, metadata={"help": "bits of the ciphertext modulus q"})
    packing: str = field(default="complex", metadata={"help": "'complex': 2 reals per slot; 'real': 1"})
    security_bits: int = field(default=128, metadata={"help": "HE-standard security level: 128, 192 or 256"})
    max_clients: int = field(default=64, metadata={"help": "most updates one aggregate may sum"})

    def __post_init__(self) -> None:
        for name in ("ring_dim", "scale_bits", "first_mod_bits", "security_bits", "max_clients"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ParameterError(f"CKKSParams.{name} must be an int, got {value!r}")
        if self.security_bits not in HE_STANDARD_MAX_LOGQ:
            raise ParameterError(
                f"CKKSParams.security_bits={self.security_bits} is not one of 128, 192, 256")
        table = HE_STANDARD_MAX_LOGQ[self.security_bits]
        if self.ring_dim not in table:
            raise ParameterError(
                f"CKKSParams.ring_dim={self.ring_dim} is not a power of two in "
                f"[{min(table)}, {max(table)}]")
        if self.packing not in ("complex", "real"):
            raise ParameterError(f"CKKSParams.packing={self.packing!r} is not 'complex' or 'real'")
        if not 0 < self.first_mod_bits <= MAX_MODULUS_BITS:
            raise ParameterError(
                f"CKKSParams.first_mod_bits={self.first_mod_bits} is not in (0, {MAX_MODULUS_BITS}]")
        if self.scale_bits < MIN_SCALE_BITS:
            raise ParameterError(
                f"CKKSParams.scale_bits={self.scale_bits} is below {MIN_SCALE_BITS}: "
                "too little precision for LoRA updates")
        if self.scale_bits >= self.first_mod_bits:
            raise ParameterError(
                f"CKKSParams.scale_bits={self.scale_bits} must be below "
                f"first_mod_bits={self.first_mod_bits}: the scale must fit in the modulus")
        # Key switching material doubles the modulus OpenFHE counts, so budget 2 * first_mod_bits.
        log_qp = 2 * self.first_mod_bits
        if log_qp > table[self.ring_dim]:
            raise ParameterError(
                f"CKKSParams(ring_dim={self.ring_dim}, first_mod_bits={self.first_mod_bits}) is "
                f"below {self.security_bits}-bit security: log2(QP)~{log_qp} exceeds "
                f"{table[self.ring_dim]}; use a larger ring_dim")
        if self.max_clients < 1:
            raise ParameterError(f"CKKSParams.max_clients={self.max_clients} must be >= 1")
        if self.value_bound < 1.0:
            # Name the offending values themselves (not only their difference), like every
            # other ParameterError here.
            raise ParameterError(
                f"CKKSParams(scale_bits={self.scale_bits}, first_mod_bits={self.first_mod_bits},"
                f" max_clients={self.max_clients}) leaves no headroom: first_mod_bits - "
                f"scale_bits = "
                f"{self.first_mod_bits - self.scale_bits} bits cannot hold the sum of "
                f"{self.max_clients} values of magnitude 1 (needs "
                f"{2 + (self.max_clients - 1).bit_length()}); lower scale_bits or max_clients")

    @property
    def slots(self) -> int:
        return self.ring_dim // 2

    @property
    def values_per_ciphertext(self) -> int:
        """Real values one ciphertext carries."""
        return self.ring_dim if self.packing == "complex" else self.ring_dim // 2

    @property
    def total_bound(self) -> float:
        """Largest |sum| an aggregate slot holds: q/2 >= 2**(first_mod_bits-2), over the scale."""
        return float(2 ** (self.first_mod_bits - 2 - self.scale_bits))

    @property
    def value_bound(self) -> float:
        """Largest |weight * value| one client may send so max_clients of them still fit."""
        return self.total_bound / self.max_clients

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "CKKSParams":
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ParameterError(f"unknown CKKSParams fields {sorted(unknown)}")
        return cls(**d)

    def fingerprint(self) -> bytes:
        return hashlib.sha256(b"fedshield-params-v1" + self.to_json().encode()).digest()
