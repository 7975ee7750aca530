"""CKKS parameters: a frozen, self-validating dataclass that needs no openfhe to exist."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, fields, replace

from ..base.errors import ParameterError
from . import flood_sizing

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
# OpenFHE counts an auxiliary key-switching modulus P of about this size into log2(QP) even for
# a context without key-switching keys (measured with openfhe 1.6.1: at N=4096 it accepts a
# 48-bit q and refuses 49 against the standard's 109 bits).
KEYSWITCH_BITS = 61
# Below this the CKKS encoding error swamps the fine-tuning signal.
MIN_SCALE_BITS = 30
# Noise flooding (flood_bits > 0) runs on 2 or more RNS towers (CKKSParams.flood_towers, sized
# by for_precision from fedshield.he.flood_sizing): one 60-bit tower cannot hold the flooding
# noise next to the values (docs/THREAT_MODEL.md).
MIN_FLOOD_TOWERS, MAX_FLOOD_TOWERS = 2, 4
# Flooding contexts made before the flooding was sized by LMSS22 (uniform smudging): 3 towers,
# slot values up to 4 per client, each prime counted one bit short. Their JSON names no
# flood_towers (CKKSParams.legacy_flooding), so their fingerprints stay.
LEGACY_FLOOD_TOWERS = 3
LEGACY_FLOOD_VALUE_BOUND = 4.0
# Statistical security levels (bits) noise flooding accepts.
MIN_FLOOD_BITS, MAX_FLOOD_BITS = 20, 64
# The precision promise of flooding contexts: the flooding error of a decrypted average stays
# within the tolerance at this many standard deviations (fedshield.he.flooding.check_precision).
PRECISION_SIGMAS = 6

# The noise model of for_precision: log2 of the largest error (over the slots of one
# ciphertext, in units of 2**-scale) of one fresh encryption, measured with openfhe 1.6.1 at
# N=4096 (5.4e-7 at scale 2**30 with the secret key, 7.7e-5 with the public key), rounded up.
NOISE_BITS_OF_ENCRYPTION = {"shared": 9.5, "threshold": 16.5}
# OpenFHE's multiparty decryption adds its own fixed noise to each partial decryption: the
# fused result's largest error, 6.3e-7 at scale 2**50 with 3 parties, rounded up.
THRESHOLD_DECRYPTION_NOISE_BITS = 29.5


def sum_noise(n_summed: int, *, seeded: bool, decryptors: int = 0) -> float:
    """The largest slot error (in units of 2**-scale) of a sum of ``n_summed`` fresh
    encryptions (secret-key when ``seeded``, else public-key), decrypted by ``decryptors``
    threshold parties (0: one key)."""
    bits = NOISE_BITS_OF_ENCRYPTION["shared" if seeded else "threshold"]
    noise = math.sqrt(max(n_summed, 1)) * 2.0 ** bits
    if decryptors:
        noise += math.sqrt(decryptors / 3) * 2.0 ** THRESHOLD_DECRYPTION_NOISE_BITS
    return noise


# log2 of the decryptions one key may make, unless a run says otherwise (--decryption_budget)
DEFAULT_LOG_QUERIES = 20
# What a decrypted average may differ from the plaintext one by (absolute, values of magnitude
# <= 1) unless the caller says otherwise.
DEFAULT_TOLERANCE = 1e-6
# Threshold profiles are sized for this many parties at least (the documented profile).
THRESHOLD_PROFILE_PARTIES = 16
# Fields that state a request or record how the parameters came about: never part of the
# parameters' JSON, so they change no fingerprint.
_REQUEST_FIELDS = ("tolerance", "request")


@dataclass(frozen=True)
class CKKSParams:
    """CKKS parameters of a federation (depth 0: ciphertexts are only added).

    A precision request when none of ``ring_dim``, ``first_mod_bits`` and ``scale_bits`` is
    given: ``tolerance``, ``max_clients``, ``security_bits`` and ``flood_bits`` state what the
    caller wants, and the fields show its resolution for shared keys (:meth:`for_precision`);
    each keygen resolves it for its own key mode (:meth:`for_keys`; ``request`` is True).
    Whatever is given explicitly is honoured and validated; what is not comes from the
    resolution.

    The modulus q is one prime of ``first_mod_bits`` bits; values are encoded at scale
    2**scale_bits. What lies between them is headroom for the sum of ``max_clients`` updates.
    The defaults are :meth:`for_precision`'s profile for 1e-6 at 64 clients with a shared key.

    ``seeded``: key holders that have the secret key encrypt with it and send c0 and a 32-byte
    seed only (fedshield.he.seeded); threshold parties, which hold key shares, always encrypt
    with the joint public key, so threshold federations use unseeded parameters.

    With ``flood_bits`` = lambda > 0, every decryption that leaves a key holder is flooded at
    lambda bits of statistical security over 2**flood_log_queries decrypted ciphertexts
    (fedshield.he.flooding, docs/THREAT_MODEL.md): the modulus is then ``flood_towers`` primes
    (first_mod_bits + (flood_towers - 1) * scale_bits bits) and values are pre-scaled by
    2**prescale_bits.
    """

    ring_dim: int = field(default=None, metadata={
        "help": "ring dimension N (power of two); N/2 slots (None: resolved from the request)"})
    scale_bits: int = field(default=None, metadata={
        "help": "log2 of the CKKS scaling factor (None: resolved from the request)"})
    first_mod_bits: int = field(default=None, metadata={
        "help": "bits of the ciphertext modulus q (None: resolved from the request)"})
    packing: str = field(default="complex", metadata={"help": "'complex': 2 reals per slot; 'real': 1"})
    security_bits: int = field(default=128, metadata={"help": "HE-standard security level: 128, 192 or 256"})
    max_clients: int = field(default=64, metadata={"help": "most updates one aggregate may sum"})
    flood_bits: int = field(default=0, metadata={
        "help": "noise flooding of every decryption at this statistical security level "
                "(bits; 0 = off). Runs on flood_towers RNS towers (2 at the profiles)"})
    flood_log_queries: int = field(default=DEFAULT_LOG_QUERIES, metadata={
        "help": "log2 of the decrypted ciphertexts the flooding guarantee covers"})
    flood_towers: int = field(default=None, metadata={
        "help": "RNS towers of a flooding context (None: as for_precision sizes them)"})
    legacy_flooding: bool = field(default=False, metadata={
        "help": "a flooding context written before the LMSS22 sizing (its JSON names no "
                "flood_towers): 3 towers, slot values up to 4 per client"})
    seeded: bool = field(default=True, metadata={
        "help": "key holders with the secret key send seeded updates (c0 and a seed)"})
    tolerance: float = field(default=DEFAULT_TOLERANCE, compare=False, metadata={
        "help": "the request: how far a decrypted average may be from the plaintext one "
                "(absolute, values of magnitude <= 1)"})
    request: bool = field(default=False, init=False, compare=False, metadata={
        "help": "True when no ring_dim, first_mod_bits or scale_bits was given"})

    def __post_init__(self) -> None:
        for name in ("ring_dim", "scale_bits", "first_mod_bits", "security_bits", "max_clients",
                     "flood_bits", "flood_log_queries", "flood_towers"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise ParameterError(f"CKKSParams.{name} must be an int, got {value!r}")
        sized = ("ring_dim", "first_mod_bits", "scale_bits")
        if any(getattr(self, name) is None for name in sized):
            # A request (or partly one): the shared-key profile fills in what was not given.
            profile = self.for_precision(self.tolerance, self.max_clients, keys="shared",
                                         flood_bits=self.flood_bits,
                                         flood_log_queries=self.flood_log_queries,
                                         security_bits=self.security_bits, packing=self.packing)
            object.__setattr__(self, "request", all(getattr(self, n) is None for n in sized))
            for name in sized + ("flood_towers",):
                if getattr(self, name) is None:
                    object.__setattr__(self, name, getattr(profile, name))
        if self.flood_bits and self.flood_towers is None:
            object.__setattr__(self, "flood_towers", MIN_FLOOD_TOWERS)
        if self.flood_towers is not None and not (
                MIN_FLOOD_TOWERS <= self.flood_towers <= MAX_FLOOD_TOWERS):
            raise ParameterError(f"CKKSParams.flood_towers={self.flood_towers} is not in "
                                 f"[{MIN_FLOOD_TOWERS}, {MAX_FLOOD_TOWERS}]")
        if self.legacy_flooding is not False and not (
                self.legacy_flooding is True and self.flood_bits
                and self.flood_towers == LEGACY_FLOOD_TOWERS):
            raise ParameterError(
                f"CKKSParams.legacy_flooding={self.legacy_flooding!r} needs flood_bits > 0 and "
                f"flood_towers={LEGACY_FLOOD_TOWERS} (got {self.flood_bits}, "
                f"{self.flood_towers})")
        if isinstance(self.tolerance, bool) or not (isinstance(self.tolerance, (int, float))
                                                    and 0 < self.tolerance < 1):
            raise ParameterError(f"CKKSParams.tolerance={self.tolerance!r} must be in (0, 1)")
        if self.security_bits not in HE_STANDARD_MAX_LOGQ:
            raise ParameterError(
                f"CKKSParams.security_bits={self.security_bits} is not one of 128, 192, 256")
        table = HE_STANDARD_MAX_LOGQ[self.security_bits]
        if self.ring_dim not in table:
            raise ParameterError(
                f"CKKSParams.ring_dim={self.ring_dim} is not a power of two in "
                f"[{min(table)}, {max(table)}]")
        if not isinstance(self.seeded, bool):
            raise ParameterError(f"CKKSParams.seeded must be a bool, got {self.seeded!r}")
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
        # OpenFHE counts the key-switching modulus P on top of Q (KEYSWITCH_BITS).
        log_qp = self.log_q + KEYSWITCH_BITS
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

    @classmethod
    def for_precision(cls, tolerance: float = 1e-6, max_clients: int = 64, *,
                      keys: str = "shared", n_parties: int = 16, flood_bits: int = 0,
                      flood_log_queries: int = DEFAULT_LOG_QUERIES,
                      security_bits: int = 128, packing: str = "complex") -> "CKKSParams":
        """The smallest one-tower parameters (ring dimension, modulus, scale) whose decrypted
        weighted average is within ``tolerance`` (absolute, values of magnitude <= 1) of the
        plaintext one, for up to ``max_clients`` updates whose weight bound is at most twice
        the round's largest weight (what the Server picks; encrypt_update refuses a weight
        whose bound could break ``tolerance``).

        keys="shared": seeded secret-key encryption; keys="threshold": the joint public key
        and OpenFHE's multiparty decryption noise of up to ``n_parties`` parties. With
        ``flood_bits``, the smallest ring and towers whose effective scale keeps the flooding
        error that LMSS22 requires for the aggregate's noise (fedshield.he.flood_sizing: every
        one of ``n_parties`` parties floods; 2**flood_log_queries decryptions) within the
        tolerance at PRECISION_SIGMAS standard deviations, next to the pre-scaled values.
        Noise model
        (measured with openfhe 1.6.1, max over the slots of one ciphertext, in units of
        2**-scale): :func:`sum_noise`.
        """
        if keys not in NOISE_BITS_OF_ENCRYPTION:
            raise ParameterError(f"keys={keys!r} is not 'shared' or 'threshold'")
        if isinstance(tolerance, bool) or not (isinstance(tolerance, (int, float))
                                               and 0 < tolerance < 1):
            raise ParameterError(f"tolerance={tolerance!r} must be in (0, 1)")
        if isinstance(max_clients, bool) or not isinstance(max_clients, int) or max_clients < 1:
            raise ParameterError(f"max_clients={max_clients!r} must be a positive int")
        decryptors = n_parties if keys == "threshold" else 0
        # weight bound <= 2 x the round's largest weight: the average divides by >= 1/2
        noise = sum_noise(max_clients, seeded=keys == "shared", decryptors=decryptors)
        scale_bits = max(MIN_SCALE_BITS, math.ceil(math.log2(noise / 0.5 / tolerance)))
        first_mod_bits = scale_bits + 2 + (max_clients - 1).bit_length()
        table = HE_STANDARD_MAX_LOGQ.get(security_bits)
        if table is None:
            raise ParameterError(f"security_bits={security_bits} is not one of 128, 192, 256")
        if first_mod_bits > MAX_MODULUS_BITS:
            raise ParameterError(
                f"tolerance={tolerance:g} at {max_clients} clients needs a "
                f"{first_mod_bits}-bit modulus, more than one {MAX_MODULUS_BITS}-bit tower holds; "
                "raise tolerance or lower max_clients")
        if flood_bits:
            return cls._flooding_profile(tolerance, max_clients, keys, max(1, n_parties), noise,
                                         flood_bits, flood_log_queries, table, security_bits,
                                         packing)
        ring_dim = next((n for n in sorted(table)
                         if first_mod_bits + KEYSWITCH_BITS <= table[n]), None)
        if ring_dim is None:
            raise ParameterError(f"no ring dimension holds {first_mod_bits} bits of modulus at "
                                 f"{security_bits}-bit security")
        return cls(ring_dim=ring_dim, scale_bits=scale_bits, first_mod_bits=first_mod_bits,
                   packing=packing, security_bits=security_bits, max_clients=max_clients,
                   flood_bits=flood_bits, seeded=keys == "shared", tolerance=tolerance)

    @classmethod
    def _flooding_profile(cls, tolerance, max_clients, keys, n_parties, noise, flood_bits,
                          flood_log_queries, table, security_bits, packing) -> "CKKSParams":
        """The smallest ring, then the fewest towers and bits, for for_precision's flooding."""
        threshold = keys == "threshold"
        parties = n_parties if threshold else 1
        sum_bits = (max_clients - 1).bit_length()  # Q/4 holds max_clients values of |x| <= 1
        for ring_dim in sorted(table):
            t = flood_sizing.noise_l2_bound(ring_dim, max_clients, flood_bits, flood_log_queries,
                                            public_key=threshold, n_parties=parties)
            sigma2 = flood_sizing.flood_sigma2(t, flood_bits, flood_log_queries)
            std = flood_sizing.slot_error_std(sigma2, ring_dim, parties, smudging=threshold)
            # the average divides by >= 1/2 (see above): flooding and encryption noise together
            effective = math.ceil(math.log2(2 * (PRECISION_SIGMAS * std + noise) / tolerance))
            need = effective + 2 + sum_bits  # log_q_min: the values' Q/4 and the noise's
            for towers in range(MIN_FLOOD_TOWERS, MAX_FLOOD_TOWERS + 1):
                log_q = need + 1  # log_q_min
                scale_bits = max(MIN_SCALE_BITS, -(-(log_q - MAX_MODULUS_BITS) // (towers - 1)))
                first_mod_bits = log_q - (towers - 1) * scale_bits
                if first_mod_bits <= scale_bits or log_q + KEYSWITCH_BITS > table[ring_dim]:
                    continue
                return cls(ring_dim=ring_dim, scale_bits=scale_bits,
                           first_mod_bits=first_mod_bits, packing=packing,
                           security_bits=security_bits, max_clients=max_clients,
                           flood_bits=flood_bits, flood_log_queries=flood_log_queries,
                           flood_towers=towers, seeded=not threshold, tolerance=tolerance)
        raise ParameterError(f"no ring dimension holds flooding at flood_bits={flood_bits} over "
                             f"2**{flood_log_queries} decryptions at {security_bits}-bit security")

    def for_keys(self, keys: str, n_parties: int = 0) -> "CKKSParams":
        """These parameters for a key mode: a request is resolved (``keys="threshold"``:
        unseeded, sized for max(n_parties, 16) parties' decryption noise; with flooding, for
        the n_parties whose every partial decryption is flooded), explicit parameters come back
        as they are (each keygen validates them)."""
        if not self.request:
            return self
        parties = (max(n_parties, 1) if self.flood_bits
                   else max(n_parties, THRESHOLD_PROFILE_PARTIES))
        profile = self.for_precision(
            self.tolerance, self.max_clients, keys=keys, n_parties=parties,
            flood_bits=self.flood_bits, flood_log_queries=self.flood_log_queries,
            security_bits=self.security_bits, packing=self.packing)
        return replace(profile, seeded=self.seeded and keys == "shared")

    def average_error_bound(self, n_summed: int, weight_sum: float,
                            decryptors: int = 0) -> float:
        """A bound on the absolute error of a decrypted weighted average of values of magnitude
        <= 1: the noise of ``n_summed`` encryptions (and of ``decryptors`` threshold parties'
        partial decryptions) over ``weight_sum`` = sum(w) / weight_bound. Noise flooding adds
        its own (fedshield.he.flooding). Measured at the defaults, 64 clients, weight_sum 1/2:
        6.1e-7 against this bound's 6.7e-7."""
        if not weight_sum > 0:
            return math.inf
        noise = sum_noise(n_summed, seeded=self.seeded, decryptors=decryptors)
        return noise / 2.0 ** self.effective_scale_bits / weight_sum

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
        """RNS towers of the ciphertext modulus: 1, or flood_towers with flooding."""
        return self.flood_towers if self.flooding else 1

    @property
    def log_q(self) -> int:
        """log2(Q) as OpenFHE sizes it: the first modulus, then one scale-sized prime per
        further tower."""
        return self.first_mod_bits + (self.n_towers - 1) * self.scale_bits

    @property
    def log_q_min(self) -> int:
        """A lower bound on log2(Q), which every context checks against its moduli: each
        tower's prime has exactly its bit size; the LMSS22-sized flooding towers count on
        OpenFHE's primes next to 2**bits (their product reaches 2**(log_q - 1))."""
        if self.flooding and not self.legacy_flooding:
            return self.log_q - 1
        return (self.first_mod_bits - 1) + (self.n_towers - 1) * (self.scale_bits - 1)

    @property
    def prescale_bits(self) -> int:
        """Values are multiplied by 2**prescale_bits before encoding (flooding only): the
        effective scale 2**(scale_bits + prescale_bits) uses the extra towers, so that the
        flooding noise stays far below one unit of the last decimal that matters."""
        if not self.flooding:
            return 0
        # Q/4 holds max_clients values of magnitude 1 (legacy contexts: 4); the other Q/4 is
        # room for the flooding noise (checked against the actual noise in fedshield.he.flooding).
        extra = int(LEGACY_FLOOD_VALUE_BOUND).bit_length() - 1 if self.legacy_flooding else 0
        sum_bits = (self.max_clients - 1).bit_length() + extra
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

    def to_dict(self) -> dict:
        """Every parameter and the tolerance they were resolved for (what metrics.json records)."""
        d = asdict(self)
        del d["request"]
        return d

    def to_json(self) -> str:
        d = asdict(self)
        for name in _REQUEST_FIELDS:
            del d[name]
        if not self.flooding:
            # Parameters without flooding keep the JSON (and so the fingerprints) they had
            # before flooding existed; a non-default decryption budget is still part of them.
            del d["flood_bits"]
            if self.flood_log_queries == DEFAULT_LOG_QUERIES:
                del d["flood_log_queries"]
        del d["legacy_flooding"]
        if not self.flooding or self.legacy_flooding:
            del d["flood_towers"]  # fingerprints of contexts made before flood_towers existed
        if not self.seeded:
            del d["seeded"]  # likewise for the parameters of unseeded (wire v2) contexts
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "CKKSParams":
        known = {f.name for f in fields(cls) if f.init}
        unknown = set(d) - known
        if unknown:
            raise ParameterError(f"unknown CKKSParams fields {sorted(unknown)}")
        # Contexts written before seeded updates existed name no "seeded": they are unseeded,
        # whatever today's default; flooding contexts that name no flood_towers are the
        # 3-tower contexts made before the LMSS22 sizing.
        legacy = ({"flood_towers": LEGACY_FLOOD_TOWERS, "legacy_flooding": True}
                  if d.get("flood_bits", 0) and "flood_towers" not in d else {})
        return cls(**{"seeded": False, **legacy, **d})

    def fingerprint(self) -> bytes:
        return hashlib.sha256(b"fedshield-params-v1" + self.to_json().encode()).digest()
