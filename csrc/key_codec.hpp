// Key material and partial decryptions on the wire: E polynomials (a public key: b and a,
// E = 2; a secret key or a partial decryption: E = 1), each T RNS towers of N residues in
// OpenFHE's evaluation form. Only the residues travel, tower i bit-packed to bit_length(q_i)
// bits as in an update; the receiver writes them into a template serialized from its own
// context, so OpenFHE never parses a byte that came from another machine (a key or context
// serialization with one edited byte crashed the receiving process inside OpenFHE's
// deserializer: SIGSEGV, SIGABRT, SIGFPE).
//
// Every size is implied by the receiver's own parameters (N, the moduli, E), never read from
// the input: a packed run either has exactly that many bytes or is refused, so hostile input
// cannot make the receiver allocate more than its parameters imply.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "ciphertext_layout.hpp"

namespace fedshield {

// At most this many polynomials in one packed run (a public key has 2).
constexpr size_t kMaxPolys = 2;

// Bytes of E packed polynomials: E * N * sum_i bit_length(q_i) / 8 (N a multiple of 8).
uint64_t packed_polys_bytes(uint64_t ring_dim, const std::vector<uint64_t>& moduli,
                            size_t elements);

// Packs the E * T residue arrays of an OpenFHE serialization made by this process (found by
// parsing it: exactly E * T runs of N residues, run k below q_{k mod T}). `what` names the
// object in errors.
std::string encode_polys(const uint8_t* data, size_t len, uint64_t ring_dim,
                         const std::vector<uint64_t>& moduli, size_t elements, const char* what);

// Unpacks E packed polynomials from outside into E * T * N residues (element-major, then
// tower-major), refusing (InvalidUpdateError naming `what`) a ring dimension that is not a
// multiple of 8 in [8, 131072], bad moduli, a size other than packed_polys_bytes(), or a
// residue not below its tower's modulus.
std::vector<uint64_t> decode_polys(const uint8_t* packed, size_t len, uint64_t ring_dim,
                                   const std::vector<uint64_t>& moduli, size_t elements,
                                   const char* what);

// decode_polys, then the residues written into a copy of `tmpl` at the E * T offsets of
// `layout` (each preceded by its length word, which must read N). The decoded residues are
// wiped before returning (they may be a secret key's).
// Packs E * T * N residues (polynomial-major, then tower-major) made here, refusing (as
// decode_polys) a count other than E * T * N or a residue not below its tower's modulus: the
// common polynomial a of collective key generation and the key-check probes.
std::string pack_polys(const uint64_t* residues, size_t count, uint64_t ring_dim,
                       const std::vector<uint64_t>& moduli, size_t elements, const char* what);

// The sum mod each tower's modulus of packed runs of E polynomials (each one checked as
// decode_polys checks it), packed again: the joint public key's b is the sum of every
// party's b_i, computed the same way by the parties and by the server (which has no openfhe).
std::string sum_polys(const std::vector<std::pair<const uint8_t*, size_t>>& runs,
                      uint64_t ring_dim, const std::vector<uint64_t>& moduli, size_t elements,
                      const char* what);

std::string rebuild_polys(const uint8_t* packed, size_t len, const uint8_t* tmpl,
                          size_t tmpl_len, const CiphertextLayout& layout, size_t elements,
                          const char* what);

}  // namespace fedshield
