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
# OpenFHE counts an auxiliary key-switching modulus P into log2(QP) even for a context without
# key-switching keys: this many bits per 60 bits of its largest digit (measured with openfhe
# 1.6.1: at N=4096 it accepts a 48-bit q and refuses 49 against the standard's 109 bits).
KEYSWITCH_BITS = 61


def keyswitch_bits(first_mod_bits: int, scale_bits: int, towers: int) -> int:
    """log2(P) as OpenFHE 1.6.1 sizes it for these towers: hybrid key switching splits them
    into 1 digit (one tower), 2 (up to 4) or 3, and P must exceed the largest digit, in primes
    of up to 60 bits (measured at N=8192: 52+52 and 58+30 bits are accepted, 60+41 and
    40+30+30 refused against the standard's 218)."""
    digits = 1 if towers == 1 else 2 if towers <= 4 else 3
    per = -(-towers // digits)
    largest = first_mod_bits + (per - 1) * scale_bits  # the first digit holds the first modulus
    return KEYSWITCH_BITS * -(-(largest + 1) // 60)
# Below this the CKKS encoding error swamps the fine-tuning signal.
MIN_SCALE_BITS = 30
# Noise flooding (flood_bits > 0) runs on 2 or more RNS towers (CKKSParams.towers, sized by
# for_precision from fedshield.he.flood_sizing): one 60-bit tower cannot hold the flooding
# noise next to the values (docs/THREAT_MODEL.md). Without flooding, a profile takes more than
# one tower when its precision needs more than one 60-bit prime (threshold keys with a default
# weight bound).
MIN_FLOOD_TOWERS, MAX_TOWERS = 2, 4
# Flooding contexts made before the flooding was sized by LMSS22 (uniform smudging): 3 towers,
# slot values up to 4 per client, each prime counted one bit short. Their JSON names no
# towers (CKKSParams.legacy_flooding), so their fingerprints stay.
LEGACY_FLOOD_TOWERS = 3
LEGACY_FLOOD_VALUE_BOUND = 4.0
# Statistical security levels (bits) noise flooding accepts.
MIN_FLOOD_BITS, MAX_FLOOD_BITS = 20, 64
# The precision promise of flooding contexts: the flooding error of a decrypted average stays
# within the tolerance at this many standard deviations (fedshield.he.flooding.check_precision).
PRECISION_SIGMAS = 6

# The noise model of for_precision and average_error_bound, from the distributions themselves
# (each term checked against openfhe 1.6.1 and the native code by tests/test_noise_model.py):
# every error polynomial has independent coefficients, and one decrypted real value sums N of
# them through the canonical embedding (variance N/2 times a coefficient's). Per update, a
# coefficient carries the encoding's rounding (variance 1/12) and the encryption error:
# - secret-key (seeded) encryption: e, a discrete Gaussian of variance sigma_e**2;
# - public-key encryption under a key of P parties: v * e_pk + e0 + s * e1, with v and s
#   ternary (variance 2/3 per coefficient, s the sum of P secrets) and e_pk the sum of P
#   errors: variance (4/3) N P sigma_e**2 + sigma_e**2.
# Each threshold party's partial decryption adds OpenFHE's smudging (variance 2**40).
# Measured at N=8192: shared keys 2**7.67 (model 2**7.68); 3 threshold parties 2**26.79
# (model 2**26.79, the smudging dominates).
ENCODING_ROUNDING_VARIANCE = 1 / 12
# Decrypted values are float32: rounding to it moves a value of magnitude <= 1 by <= 2**-25.
OUTPUT_ROUNDING = 2.0 ** -25


def slot_noise_std(n_summed: int, *, seeded: bool, decryptors: int = 0,
                   ring_dim: int = 4096, key_parties: int = 0) -> float:
    """The standard deviation of the error of one decrypted real value (in units of
    2**-scale) of a sum of ``n_summed`` fresh encryptions (secret-key when ``seeded``, else
    public-key under a key of ``key_parties`` parties, at least ``decryptors``) decrypted by
    ``decryptors`` threshold parties (0: one key), with no flooding."""
    sigma2 = flood_sizing.ERROR_SIGMA ** 2
    per_update = sigma2 + ENCODING_ROUNDING_VARIANCE
    if not seeded:
        parties = max(1, key_parties, decryptors)
        per_update += 4 / 3 * ring_dim * parties * sigma2
    coefficient = max(n_summed, 1) * per_update + decryptors * flood_sizing.SMUDGING_SIGMA2
    return math.sqrt(ring_dim / 2 * coefficient)


def sum_noise(n_summed: int, *, seeded: bool, decryptors: int = 0,
              ring_dim: int = 4096, key_parties: int = 0) -> float:
    """The largest error (in units of 2**-scale) of a decrypted value of such a sum: the
    noise at PRECISION_SIGMAS standard deviations (:func:`slot_noise_std`)."""
    return PRECISION_SIGMAS * slot_noise_std(n_summed, seeded=seeded, decryptors=decryptors,
                                             ring_dim=ring_dim, key_parties=key_parties)


def check_tolerance(tolerance: float, name: str = "tolerance") -> None:
    """ParameterError unless a precision request's tolerance is a number in [2 x
    OUTPUT_ROUNDING, 1): below that, the float32 rounding alone would use most of it."""
    if isinstance(tolerance, bool) or not (isinstance(tolerance, (int, float))
                                           and 2 * OUTPUT_ROUNDING <= tolerance < 1):
        raise ParameterError(
            f"{name}={tolerance!r} must be a number in [{2 * OUTPUT_ROUNDING:.2g}, 1): "
            f"decrypted values are float32, which alone round by up to {OUTPUT_ROUNDING:.2g}")


def power_of_two_bound(weight: float) -> float:
    """The smallest power of two at or above ``weight`` (at least 1): a weight bound that
    pre-divides exactly."""
    return float(2 ** max(0, math.ceil(math.log2(weight))))


# log2 of the decryptions one key may make, unless a run says otherwise (--decryption_budget)
DEFAULT_LOG_QUERIES = 20
# What a decrypted average may differ from the plaintext one by (absolute, values of magnitude
# <= 1) unless the caller says otherwise.
DEFAULT_TOLERANCE = 1e-6
# Threshold profiles are sized for this many parties at least (the documented profile).
THRESHOLD_PROFILE_PARTIES = 16
# The weights a precision request covers with no weight bound passed: every update of such a
# context is pre-divided by the next power of two of this (CKKSParams.default_weight_bound), so
# updates of any weights from 1 to it sum within the tolerance, whatever their mix.
DEFAULT_MAX_WEIGHT = 10 ** 6
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

    The modulus q is one prime of ``first_mod_bits`` bits (or ``towers`` primes, see below);
    values are encoded at scale 2**scale_bits. What lies between them is headroom for the sum of
    ``max_clients`` updates. The defaults are :meth:`for_precision`'s profile for 1e-6 at 64
    clients with a shared key, for any weights from 1 to ``max_weight`` = 10**6 with no weight
    bound passed.

    ``max_weight`` > 0: an update encrypted with no ``weight_bound`` is pre-divided by
    :attr:`default_weight_bound` (the next power of two of max_weight), the same for every
    update of the context, so updates of any weights in [1, max_weight] sum; the scale is sized
    for the worst of them (one update of weight 1). 0: no shared default; such an update takes
    its own weight's next power of two and sums only with updates of that bound (what
    parameters written before max_weight existed, and explicit ones, mean; fedshield's engines
    use it, since their Server sends each round's bound).

    ``seeded``: key holders that have the secret key encrypt with it and send c0 and a 32-byte
    seed only (fedshield.he.seeded); threshold parties, which hold key shares, always encrypt
    with the joint public key, so threshold federations use unseeded parameters.

    With ``flood_bits`` = lambda > 0, every decryption that leaves a key holder is flooded at
    lambda bits of statistical security over 2**flood_log_queries decrypted ciphertexts
    (fedshield.he.flooding, docs/THREAT_MODEL.md). With flooding, or when the precision needs
    more than one 60-bit prime, the modulus is ``towers`` primes (first_mod_bits + (towers - 1)
    * scale_bits bits) and values are pre-scaled by 2**prescale_bits.
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
                "(bits; 0 = off). Runs on 2 or more RNS towers"})
    flood_log_queries: int = field(default=DEFAULT_LOG_QUERIES, metadata={
        "help": "log2 of the decrypted ciphertexts the flooding guarantee covers"})
    towers: int = field(default=None, metadata={
        "help": "RNS towers of the modulus (None: as for_precision sizes them; 1 without "
                "flooding unless the precision needs more)"})
    legacy_flooding: bool = field(default=False, metadata={
        "help": "a flooding context written before the LMSS22 sizing (its JSON names no "
                "towers): 3 towers, slot values up to 4 per client"})
    max_weight: int = field(default=None, metadata={
        "help": "weights from 1 to this sum with no weight bound passed (0: each update's own "
                "bound; None: 10**6 for a request, 0 for explicit parameters)"})
    seeded: bool = field(default=True, metadata={
        "help": "key holders with the secret key send seeded updates (c0 and a seed)"})
    tolerance: float = field(default=DEFAULT_TOLERANCE, compare=False, metadata={
        "help": "the request: how far a decrypted average may be from the plaintext one "
                "(absolute, values of magnitude <= 1)"})
    request: bool = field(default=False, init=False, compare=False, metadata={
        "help": "True when no ring_dim, first_mod_bits or scale_bits was given"})

    def __post_init__(self) -> None:
        for name in ("ring_dim", "scale_bits", "first_mod_bits", "security_bits", "max_clients",
                     "flood_bits", "flood_log_queries", "towers", "max_weight"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise ParameterError(f"CKKSParams.{name} must be an int, got {value!r}")
        sized = ("ring_dim", "first_mod_bits", "scale_bits")
        if any(getattr(self, name) is None for name in sized):
            # A request (or partly one): the shared-key profile fills in what was not given.
            if self.max_weight is None:
                object.__setattr__(self, "max_weight", DEFAULT_MAX_WEIGHT)
            profile = self.for_precision(self.tolerance, self.max_clients, keys="shared",
                                         flood_bits=self.flood_bits,
                                         flood_log_queries=self.flood_log_queries,
                                         security_bits=self.security_bits, packing=self.packing,
                                         max_weight=self.max_weight)
            object.__setattr__(self, "request", all(getattr(self, n) is None for n in sized))
            for name in sized + ("towers",):
                if getattr(self, name) is None:
                    object.__setattr__(self, name, getattr(profile, name))
        if self.max_weight is None:
            object.__setattr__(self, "max_weight", 0)
        if self.max_weight < 0:
            raise ParameterError(f"CKKSParams.max_weight={self.max_weight} must be 0 (each "
                                 "update's own bound) or the largest weight to cover")
        if self.towers is None:
            object.__setattr__(self, "towers", MIN_FLOOD_TOWERS if self.flood_bits else 1)
        low = MIN_FLOOD_TOWERS if self.flood_bits else 1
        if not low <= self.towers <= MAX_TOWERS:
            raise ParameterError(f"CKKSParams.towers={self.towers} is not in [{low}, "
                                 f"{MAX_TOWERS}]" + (" (noise flooding needs 2 or more)"
                                                     if self.flood_bits else ""))
        if self.legacy_flooding is not False and not (
                self.legacy_flooding is True and self.flood_bits
                and self.towers == LEGACY_FLOOD_TOWERS):
            raise ParameterError(
                f"CKKSParams.legacy_flooding={self.legacy_flooding!r} needs flood_bits > 0 and "
                f"towers={LEGACY_FLOOD_TOWERS} (got {self.flood_bits}, {self.towers})")
        check_tolerance(self.tolerance, "CKKSParams.tolerance")
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
        # OpenFHE counts the key-switching modulus P on top of Q.
        log_qp = self.log_q + keyswitch_bits(self.first_mod_bits, self.scale_bits,
                                             self.n_towers)
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
                      security_bits: int = 128, packing: str = "complex",
                      max_weight: int = DEFAULT_MAX_WEIGHT) -> "CKKSParams":
        """The smallest parameters (ring dimension, towers, modulus, scale) whose decrypted
        weighted average is within ``tolerance`` (absolute, values of magnitude <= 1) of the
        plaintext one, for up to ``max_clients`` updates whose weight bound is at most twice
        the round's largest weight (what the Server picks; encrypt_update refuses a weight
        whose bound could break ``tolerance``), and, with ``max_weight`` > 0, for updates of
        any weights from 1 to max_weight encrypted with no bound (:attr:`default_weight_bound`).

        keys="shared": seeded secret-key encryption; keys="threshold": the joint public key
        and OpenFHE's multiparty decryption noise of up to ``n_parties`` parties. With
        ``flood_bits``, the smallest ring and towers whose effective scale keeps the flooding
        error that LMSS22 requires for the aggregate's noise (fedshield.he.flood_sizing: every
        one of ``n_parties`` parties floods; 2**flood_log_queries decryptions) within the
        tolerance at PRECISION_SIGMAS standard deviations, next to the pre-scaled values.
        One tower when one 60-bit prime holds it, else the fewest towers that do.
        Noise model: :func:`sum_noise`, and decrypted values are rounded to float32
        (OUTPUT_ROUNDING).
        """
        if keys not in ("shared", "threshold"):
            raise ParameterError(f"keys={keys!r} is not 'shared' or 'threshold'")
        check_tolerance(tolerance)
        if isinstance(max_clients, bool) or not isinstance(max_clients, int) or max_clients < 1:
            raise ParameterError(f"max_clients={max_clients!r} must be a positive int")
        if isinstance(max_weight, bool) or not isinstance(max_weight, int) or max_weight < 0:
            raise ParameterError(f"max_weight={max_weight!r} must be an int >= 0")
        table = HE_STANDARD_MAX_LOGQ.get(security_bits)
        if table is None:
            raise ParameterError(f"security_bits={security_bits} is not one of 128, 192, 256")
        threshold = keys == "threshold"
        decryptors = n_parties if threshold else 0
        parties = max(1, n_parties) if threshold else 1
        # The sums the average must stay precise for, as (updates, sum(w) / weight bound) at
        # their worst: a round's bound is within 2x of its largest weight; the default bound
        # leaves one update of weight 1 at 1/bound (noise grows as sqrt(n), the sum as n).
        worst = [(max_clients, 0.5)]
        if max_weight:
            worst.append((1, 1.0 / power_of_two_bound(max_weight)))
        sum_bits = (max_clients - 1).bit_length()  # Q/4 holds max_clients values of |x| <= 1

        def effective_bits(ring_dim: int) -> int:
            """log2 of the (effective) scale the tolerance needs at this ring."""
            flood = 0.0
            if flood_bits:
                t = flood_sizing.noise_l2_bound(ring_dim, max_clients, flood_bits,
                                                flood_log_queries, public_key=threshold,
                                                n_parties=parties)
                sigma2 = flood_sizing.flood_sigma2(t, flood_bits, flood_log_queries)
                flood = PRECISION_SIGMAS * flood_sizing.slot_error_std(
                    sigma2, ring_dim, parties, smudging=threshold)
            error = max((flood + sum_noise(n, seeded=not threshold, decryptors=decryptors,
                                           ring_dim=ring_dim))
                        / share for n, share in worst)
            return max(MIN_SCALE_BITS,
                       math.ceil(math.log2(error / (tolerance - OUTPUT_ROUNDING))))

        fields_ = dict(packing=packing, security_bits=security_bits, max_clients=max_clients,
                       flood_bits=flood_bits, flood_log_queries=flood_log_queries,
                       seeded=not threshold, tolerance=tolerance, max_weight=max_weight)
        ring_dim = min(table)
        while not flood_bits:  # one tower, at the smallest ring that holds it (noise grows
            scale_bits = effective_bits(ring_dim)  # with the ring: size again at a larger one)
            first_mod_bits = scale_bits + 2 + sum_bits
            if first_mod_bits > MAX_MODULUS_BITS:
                break
            fits = next((n for n in sorted(table)
                         if first_mod_bits + keyswitch_bits(first_mod_bits, 0, 1) <= table[n]),
                        None)
            if fits is None:
                raise ParameterError(f"no ring dimension holds {first_mod_bits} bits of "
                                     f"modulus at {security_bits}-bit security")
            if fits <= ring_dim:
                return cls(ring_dim=ring_dim, scale_bits=scale_bits,
                           first_mod_bits=first_mod_bits, towers=1, **fields_)
            ring_dim = fits
        # Several towers: the effective scale 2**(scale_bits + prescale_bits) spans them.
        for ring_dim in sorted(table):
            need = effective_bits(ring_dim) + 2 + sum_bits  # log_q_min: the values' Q/4 and
            log_q = need + 1                                # the noise's
            for towers in range(MIN_FLOOD_TOWERS, MAX_TOWERS + 1):
                scale_bits = max(MIN_SCALE_BITS, -(-(log_q - MAX_MODULUS_BITS) // (towers - 1)))
                first_mod_bits = log_q - (towers - 1) * scale_bits
                if (scale_bits > MAX_MODULUS_BITS or first_mod_bits <= scale_bits
                        or log_q + keyswitch_bits(first_mod_bits, scale_bits, towers)
                        > table[ring_dim]):
                    continue
                return cls(ring_dim=ring_dim, scale_bits=scale_bits,
                           first_mod_bits=first_mod_bits, towers=towers, **fields_)
        what = (f"flooding at flood_bits={flood_bits} over 2**{flood_log_queries} decryptions"
                if flood_bits else f"tolerance={tolerance:g} at {max_clients} clients"
                + (f" and weights up to {max_weight}" if max_weight else ""))
        raise ParameterError(f"no ring dimension and at most {MAX_TOWERS} towers hold {what} "
                             f"at {security_bits}-bit security; raise tolerance or lower "
                             "max_clients or max_weight")

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
            security_bits=self.security_bits, packing=self.packing, max_weight=self.max_weight)
        return replace(profile, seeded=self.seeded and keys == "shared")

    def average_error_bound(self, n_summed: int, weight_sum: float,
                            decryptors: int = 0) -> float:
        """A bound on the absolute error of a decrypted weighted average of values of magnitude
        <= 1: the noise of ``n_summed`` encryptions (and of ``decryptors`` threshold parties'
        partial decryptions) over ``weight_sum`` = sum(w) / weight_bound. Noise flooding adds
        its own (fedshield.he.flooding). The noise at PRECISION_SIGMAS standard deviations
        (:func:`sum_noise`), plus the rounding of the decrypted value to float32."""
        if not weight_sum > 0:
            return math.inf
        noise = sum_noise(n_summed, seeded=self.seeded, decryptors=decryptors,
                          ring_dim=self.ring_dim)
        return noise / 2.0 ** self.effective_scale_bits / weight_sum + OUTPUT_ROUNDING

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
        """RNS towers of the ciphertext modulus."""
        return self.towers

    @property
    def default_weight_bound(self) -> float | None:
        """The weight bound of every update encrypted with no bound passed (None: each takes
        its own weight's next power of two; see ``max_weight``)."""
        return power_of_two_bound(self.max_weight) if self.max_weight else None

    @property
    def log_q(self) -> int:
        """log2(Q) as OpenFHE sizes it: the first modulus, then one scale-sized prime per
        further tower."""
        return self.first_mod_bits + (self.n_towers - 1) * self.scale_bits

    @property
    def log_q_min(self) -> int:
        """A lower bound on log2(Q), which every context checks against its moduli: each
        tower's prime has exactly its bit size; the LMSS22-sized flooding towers count on
        OpenFHE's primes next to 2**bits (their product reaches 2**(log_q - 1)); so do the
        towers a precision needs without flooding."""
        if not self.legacy_flooding:
            return self.log_q - 1
        return (self.first_mod_bits - 1) + (self.n_towers - 1) * (self.scale_bits - 1)

    @property
    def prescale_bits(self) -> int:
        """Values are multiplied by 2**prescale_bits before encoding (several towers only): the
        effective scale 2**(scale_bits + prescale_bits) uses the extra towers, so that the
        noise (and any flooding noise) stays far below one unit of the last decimal that
        matters."""
        if self.n_towers == 1:
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
        (several towers: Q/4 over the effective scale, the other Q/4 is room for the noise)."""
        if self.n_towers > 1:
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
        towers = d.pop("towers")
        if self.flooding and not self.legacy_flooding:
            d["flood_towers"] = towers  # the name flooding contexts have always written
        elif not self.flooding and towers > 1:
            d["towers"] = towers
        if not self.max_weight:
            del d["max_weight"]  # parameters made before max_weight existed meant 0
        if not self.seeded:
            del d["seeded"]  # likewise for the parameters of unseeded (wire v2) contexts
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "CKKSParams":
        d = dict(d)
        if "flood_towers" in d:  # to_json's name for a flooding context's towers
            if "towers" in d:
                raise ParameterError("CKKSParams names both towers and flood_towers")
            d["towers"] = d.pop("flood_towers")
        known = {f.name for f in fields(cls) if f.init}
        unknown = set(d) - known
        if unknown:
            raise ParameterError(f"unknown CKKSParams fields {sorted(unknown)}")
        # Contexts written before seeded updates existed name no "seeded": they are unseeded,
        # whatever today's default; those written before max_weight existed had no shared
        # default bound; flooding contexts that name no towers are the 3-tower contexts made
        # before the LMSS22 sizing.
        legacy = ({"towers": LEGACY_FLOOD_TOWERS, "legacy_flooding": True}
                  if d.get("flood_bits", 0) and "towers" not in d else {})
        return cls(**{"seeded": False, "max_weight": 0, **legacy, **d})

    def fingerprint(self) -> bytes:
        return hashlib.sha256(b"fedshield-params-v1" + self.to_json().encode()).digest()
