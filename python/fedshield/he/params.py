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
# Noise flooding (flood_bits > 0) runs on this many RNS towers: first_mod_bits + 2 * scale_bits
# bits of modulus (~160 at the defaults). See fedshield.he.flooding for why one tower cannot
# hold flooding at a useful statistical security level, and docs/THREAT_MODEL.md.
FLOOD_TOWERS = 3
# Statistical security levels (bits) noise flooding accepts.
MIN_FLOOD_BITS, MAX_FLOOD_BITS = 20, 64
# Slot values of a flooding context may reach this bound per client (like 2**50 single-tower).
FLOOD_VALUE_BOUND = 4.0


@dataclass(frozen=True)
class CKKSParams:
    """CKKS parameters of a federation (depth 0: ciphertexts are only added).

    The modulus q is one prime of ``first_mod_bits`` bits; values are encoded at scale
    2**scale_bits. What lies between them is headroom for the sum of ``max_clients`` updates.

    With ``flood_bits`` = lambda > 0, every decryption that leaves a key holder is flooded at
    lambda bits of statistical security over 2**flood_log_queries decrypted ciphertexts
    (fedshield.he.flooding, docs/THREAT_MODEL.md): the modulus is then FLOOD_TOWERS primes
    (first_mod_bits + 2 * scale_bits bits) and values are pre-scaled by 2**prescale_bits.
    """

    ring_dim: int = field(default=16384, metadata={"help": "ring dimension N (power of two); N/2 slots"})
    scale_bits: int = field(default=50, metadata={"help": "log2 of the CKKS scaling factor (precision)"})
    first_mod_bits: int = field(default=60, metadata={"help": "bits of the ciphertext modulus q"})
    packing: str = field(default="complex", metadata={"help": "'complex': 2 reals per slot; 'real': 1"})
    security_bits: int = field(default=128, metadata={"help": "HE-standard security level: 128, 192 or 256"})
    max_clients: int = field(default=64, metadata={"help": "most updates one aggregate may sum"})
    flood_bits: int = field(default=0, metadata={
        "help": "noise flooding of every decryption at this statistical security level "
                "(bits; 0 = off). Runs on 3 RNS towers (3x the bytes)"})
    flood_log_queries: int = field(default=20, metadata={
        "help": "log2 of the decrypted ciphertexts the flooding guarantee covers"})

    def __post_init__(self) -> None:
        for name in ("ring_dim", "scale_bits", "first_mod_bits", "security_bits", "max_clients",
                     "flood_bits", "flood_log_queries"):
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
        if self.flood_bits != 0 and not MIN_FLOOD_BITS <= self.flood_bits <= MAX_FLOOD_BITS:
            raise ParameterError(
                f"CKKSParams.flood_bits={self.flood_bits} must be 0 (off) or in "
                f"[{MIN_FLOOD_BITS}, {MAX_FLOOD_BITS}]")
        if not 0 <= self.flood_log_queries <= 40:
            raise ParameterError(
                f"CKKSParams.flood_log_queries={self.flood_log_queries} is not in [0, 40]")
        # Key switching material doubles the modulus OpenFHE counts, so budget twice log2(Q).
        log_qp = 2 * (self.first_mod_bits + (self.n_towers - 1) * self.scale_bits)
        if log_qp > table[self.ring_dim]:
            raise ParameterError(
                f"CKKSParams(ring_dim={self.ring_dim}, first_mod_bits={self.first_mod_bits}) is "
                f"below {self.security_bits}-bit security: log2(QP)~{log_qp} exceeds "
                f"{table[self.ring_dim]}; use a larger ring_dim")
        if self.max_clients < 1:
            raise ParameterError(f"CKKSParams.max_clients={self.max_clients} must be >= 1")
        if self.n_towers > 1 and self.prescale_bits < 0:
            raise ParameterError(
                f"CKKSParams(first_mod_bits={self.first_mod_bits}, scale_bits={self.scale_bits}, "
                f"max_clients={self.max_clients}) leaves no room for noise flooding")
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
    def flooding(self) -> bool:
        """Decryptions are flooded (fedshield.he.flooding) at ``flood_bits`` of security."""
        return self.flood_bits > 0

    @property
    def n_towers(self) -> int:
        """RNS towers of the ciphertext modulus: 1, or FLOOD_TOWERS with flooding."""
        return FLOOD_TOWERS if self.flooding else 1

    @property
    def log_q_min(self) -> int:
        """A lower bound on log2(Q): each tower's prime has exactly its bit size."""
        return (self.first_mod_bits - 1) + (self.n_towers - 1) * (self.scale_bits - 1)

    @property
    def prescale_bits(self) -> int:
        """Values are multiplied by 2**prescale_bits before encoding (flooding only): the
        effective scale 2**(scale_bits + prescale_bits) uses the extra towers, so that the
        flooding noise stays far below one unit of the last decimal that matters."""
        if not self.flooding:
            return 0
        # Q/4 holds max_clients values of magnitude FLOOD_VALUE_BOUND; the other Q/4 is room for
        # the flooding noise (checked against the actual bound in fedshield.he.flooding).
        sum_bits = (self.max_clients - 1).bit_length() + int(FLOOD_VALUE_BOUND).bit_length() - 1
        return self.log_q_min - 2 - sum_bits - self.scale_bits

    @property
    def effective_scale_bits(self) -> int:
        return self.scale_bits + self.prescale_bits

    @property
    def total_bound(self) -> float:
        """Largest |sum| an aggregate slot holds: q/2 >= 2**(first_mod_bits-2), over the scale
        (flooding: Q/4 over the effective scale, the other Q/4 is the flooding noise's)."""
        if self.flooding:
            return float(2 ** (self.log_q_min - 2 - self.effective_scale_bits))
        return float(2 ** (self.first_mod_bits - 2 - self.scale_bits))

    @property
    def value_bound(self) -> float:
        """Largest |weight * value| one client may send so max_clients of them still fit."""
        return self.total_bound / self.max_clients

    def to_json(self) -> str:
        d = asdict(self)
        if not self.flooding:
            # Parameters without flooding keep the JSON (and so the fingerprints) they had
            # before flooding existed.
            del d["flood_bits"], d["flood_log_queries"]
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "CKKSParams":
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ParameterError(f"unknown CKKSParams fields {sorted(unknown)}")
        return cls(**d)

    def fingerprint(self) -> bytes:
        return hashlib.sha256(b"fedshield-params-v1" + self.to_json().encode()).digest()
