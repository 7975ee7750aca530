"""Seeded updates (wire elements = 1): only c0 and a 32-byte seed travel.

A key holder that has the secret key s encrypts with it (OpenFHE's ``Encrypt(secretKey, pt)``:
half the cost of public-key encryption and far less noise) and gets (c0, c1) with c1 uniform.
Natively (csrc/seeded.cpp) it rewrites the ciphertext as (c0 + (c1 - a) * s, a), where a is
expanded from a fresh seed, so c1 need not travel: the decryptor expands a again. Sums of
seeded ciphertexts decrypt with c1 = the sum of their expansions, so an aggregate carries the
sum of the c0s and every summed update's seed (as Microsoft SEAL's seeded ciphertexts do).

The expansion: for each ciphertext k and RNS tower t, AES-256 in counter mode (from the
`cryptography` package) keyed by SHA-256(domain || context fingerprint || round || seed) with
the initial counter block (k, t) gives a byte stream; 8-byte words masked to bit_length(q_t)
bits and rejected when >= q_t give a uniform a mod q_t (in evaluation form, where a uniform
polynomial is as uniform as in coefficient form). The seed is fresh per update (per client),
so the key separates contexts, rounds and clients, and the counter block ciphertexts and
towers.

What the seed does not give: integrity. A seed altered in transit expands to another a and
the sum decrypts to noise, which decryption refuses when the decrypted total weight leaves
(0, n_summed] (almost always, not always: docs/WIRE.md); only authenticated updates (or TLS
to a trusted server) rule it out. A seed seen twice in one round is refused natively.
"""

from __future__ import annotations

import hashlib
import secrets

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from .. import native
from ..base.errors import InvalidUpdate

SEED_BYTES = 32
_DOMAIN = b"fedshield-seeded-a-v3"


def new_seed() -> bytes:
    """A fresh 256-bit seed from the operating system's CSPRNG."""
    return secrets.token_bytes(SEED_BYTES)


def stream_key(context_fp: bytes, round: int, seed: bytes) -> bytes:
    """The AES-256 key of one update's expansion (the same for every ciphertext and tower)."""
    if len(seed) != SEED_BYTES:
        raise InvalidUpdate(f"a seed has {len(seed)} bytes, expected {SEED_BYTES}")
    return hashlib.sha256(_DOMAIN + bytes(context_fp) + int(round).to_bytes(8, "little")
                          + bytes(seed)).digest()


def _stream_bytes(q: int, ring_dim: int) -> int:
    """Stream length that almost always yields ring_dim accepted words (acceptance q/2^bits)."""
    accept = q / 2 ** q.bit_length()
    return 8 * (int(ring_dim / accept * 1.05) + 64)


def expand(seed: bytes, context_fp: bytes, round: int, n_ciphertexts: int, moduli,
           ring_dim: int, out: np.ndarray | None = None) -> np.ndarray:
    """The polynomials a of every ciphertext of a seeded update: uint64[n_ct * T * N],
    ciphertext-major then tower-major. With ``out``, they are added into it mod each tower's
    modulus instead (how a decryptor sums the expansions of an aggregate's seeds)."""
    key = stream_key(context_fp, round, seed)
    towers = len(moduli)
    total = n_ciphertexts * towers * ring_dim
    result = np.empty(total, dtype=np.uint64) if out is None else out
    if result.shape != (total,) or result.dtype != np.uint64:
        raise ValueError(f"expand: out must be uint64[{total}]")
    for k in range(n_ciphertexts):
        for t, q in enumerate(moduli):
            at = (k * towers + t) * ring_dim
            part = result[at:at + ring_dim]
            length = _stream_bytes(int(q), ring_dim)
            while True:
                counter = k.to_bytes(8, "little") + t.to_bytes(4, "little") + bytes(4)
                stream = Cipher(algorithms.AES(key), modes.CTR(counter)).encryptor().update(
                    bytes(length))
                got = native.sample_uniform(stream, int(q), ring_dim,
                                             accumulate=None if out is None else part)
                if got is not None:
                    if out is None:
                        part[:] = got
                    break
                length *= 2  # a longer stream has the shorter one as its prefix
    return result


def expand_sum(seeds, context_fp: bytes, round: int, n_ciphertexts: int, moduli,
               ring_dim: int) -> np.ndarray:
    """The sum (mod each tower's modulus) of the expansions of an aggregate's seeds: its c1."""
    total = np.zeros(n_ciphertexts * len(moduli) * ring_dim, dtype=np.uint64)
    for seed in seeds:
        expand(seed, context_fp, round, n_ciphertexts, moduli, ring_dim, out=total)
    return total
