// t-of-n Shamir sharing of CKKS secret-key residues mod q, and the pieces threshold decryption
// needs to let present parties cover for absent ones (see python/fedshield/he/threshold.py).
// OpenFHE's own ShareKeys returns DCRTPoly objects the Python binding cannot serialize, so the
// shares are computed here on the residues of the key's BINARY serialization.
#pragma once
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <vector>

#include "csprng.hpp"

namespace fedshield {

// Bad arguments to the sharing functions (threshold, points, residues not below q).
struct ShamirInputError : std::invalid_argument {
    using std::invalid_argument::invalid_argument;
};

// Offsets of the residue arrays (one per tower, below moduli[i]) of a serialized OpenFHE
// secret key. Throws InvalidUpdateError unless exactly one per tower is found.
std::vector<uint64_t> locate_key_residues(const uint8_t* data, size_t len, uint64_t ring_dim,
                                          const std::vector<uint64_t>& moduli);

// Shares of `secret` (n values mod q) for the points xs (distinct, nonzero mod q):
// out[k][i] = secret[i] + a_1[i] x_k + ... + a_{t-1}[i] x_k^{t-1} mod q, with fresh coefficients
// drawn uniformly mod q from the kernel CSPRNG (getrandom(2), rejection sampling).
std::vector<std::vector<uint64_t>> shamir_split(const uint64_t* secret, size_t n, uint64_t modulus,
                                                unsigned threshold,
                                                const std::vector<uint64_t>& xs);

// Lagrange coefficient at 0 of the point xs[index] over the points xs, mod q (q prime).
uint64_t lagrange_at_zero(const std::vector<uint64_t>& xs, size_t index, uint64_t modulus);

// out[i] = own[i] + coefficient * sum_k shares[k][i] mod q.
void cover_absent(const uint64_t* own, const std::vector<const uint64_t*>& shares, size_t n,
                  uint64_t coefficient, uint64_t modulus, uint64_t* out);

uint64_t mulmod(uint64_t a, uint64_t b, uint64_t modulus);
uint64_t powmod(uint64_t a, uint64_t e, uint64_t modulus);

}  // namespace fedshield
