// Seeded ciphertexts (wire elements = 1): a key holder's secret-key encryption (c0, c1) with a
// uniform c1 is rewritten as (c0 + (c1 - a) * s, a), where a is expanded from a public 32-byte
// seed; then only the new c0 and the seed travel, and the decryptor expands a again. Sums of
// such ciphertexts decrypt to the sum with c1 = the sum of the expansions. All polynomials are
// in OpenFHE's evaluation (NTT) form, where multiplication is slot-wise mod each tower's prime.
//
// The random stream that a is drawn from comes from outside (the Python layer keys AES-CTR from
// `cryptography`): this file only turns stream bytes into residues, uniformly mod q, by
// rejection sampling.
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

#include "ciphertext_layout.hpp"

namespace fedshield {

// Fills out[0..n) with residues uniform in [0, q) from 8-byte little-endian words of `stream`,
// each masked to bit_length(q) bits and rejected when >= q. Returns false when the stream ran
// out first (the caller asks for a longer stream; a stream's prefix is the shorter stream).
bool sample_uniform(const uint8_t* stream, size_t len, uint64_t q, uint64_t n, uint64_t* out);

// Rewrites one serialized ciphertext in place: c0 := c0 + (c1 - a) * s, c1 := a, tower by
// tower (a and s: T runs of ring_dim residues, tower-major, below their tower's modulus).
void reseed_ciphertext(uint8_t* data, size_t len, const CiphertextLayout& layout,
                       const uint64_t* a, const uint64_t* s);

}  // namespace fedshield
