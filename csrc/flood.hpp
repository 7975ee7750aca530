// Noise flooding of decryptions (IND-CPA^D, Li-Micciancio 2021), done on the residues of
// OpenFHE's serialized polynomials: fedshield cannot call OpenFHE from C++, so it adds the
// flooding polynomial itself, in OpenFHE's evaluation (NTT) representation.
//
// A flooding polynomial f has N integer coefficients drawn independently from the discrete
// Gaussian N_Z(0, sigma2), sigma2 an integer below 2^112 (exact sampling with integer
// arithmetic from getrandom(2), discrete_gaussian.hpp; fedshield.he.flood_sizing sizes
// sigma2). The same integer polynomial is reduced mod every tower q_i and taken to the
// evaluation representation OpenFHE stores: out[j] = f(psi^(2 * bitrev(j) + 1)) mod q_i, psi
// the tower's primitive 2N-th root of unity (serialized next to its modulus), j in [0, N),
// bitrev over log2(N) bits. Adding it to c0 before decryption (or to a partial decryption)
// adds f to the decrypted coefficients.
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

namespace fedshield {

// In place: a[j] (coefficients mod q, natural order) -> evaluations in OpenFHE's bit-reversed
// order (see above). n a power of two in [2, 2^17], psi a primitive 2n-th root of unity mod q.
void ntt_forward(uint64_t* a, size_t n, uint64_t q, uint64_t psi);

// In place: the inverse of ntt_forward (evaluations in OpenFHE's order -> coefficients).
void ntt_inverse(uint64_t* a, size_t n, uint64_t q, uint64_t psi);

// Adds one fresh flooding polynomial (discrete Gaussian of variance sigma2 = v_hi * 2^64 + v_lo)
// to T residue arrays of one polynomial in evaluation representation: towers[i] holds n
// residues mod moduli[i] (primitive 2n-th roots roots[i]). Throws InvalidUpdateError on bad
// arguments (root not primitive, residue not below its modulus, sigma2 not in [1, 2^112)).
void flood_towers(const std::vector<uint64_t*>& towers, size_t n,
                  const std::vector<uint64_t>& moduli, const std::vector<uint64_t>& roots,
                  uint64_t v_hi, uint64_t v_lo);

// Adds one fresh flooding polynomial (discrete Gaussian of variance sigma2) to `count` arrays of n
// coefficients (coefficient form), towers[i] mod moduli[i], each below its modulus.
void flood_coefficients(uint64_t* const* towers, size_t count, size_t n, const uint64_t* moduli,
                        uint64_t v_hi, uint64_t v_lo);

}  // namespace fedshield
