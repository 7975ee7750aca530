// Threshold partial decryptions on the wire. A party's partial decryption of one ciphertext
// is one polynomial: T RNS towers of N residues (OpenFHE's evaluation form). Only those
// residues travel, tower i bit-packed to bit_length(q_i) bits as in an update; whoever fuses
// the shares rebuilds OpenFHE's bytes from a template of its own, so OpenFHE never parses a
// byte that came from outside (a tampered serialization crashed it inside deserialization).
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "ciphertext_layout.hpp"

namespace fedshield {

// Bytes of one packed partial decryption: N * sum_i bit_length(q_i) / 8.
uint64_t partial_bytes(uint64_t ring_dim, const std::vector<uint64_t>& moduli);

// Packs the T residue arrays of a serialized OpenFHE partial decryption (found by parsing it:
// exactly one run of N residues below q_i per tower) into partial_bytes() bytes.
std::string encode_partial(const uint8_t* data, size_t len, uint64_t ring_dim,
                           const std::vector<uint64_t>& moduli);

// Unpacks a packed partial decryption from outside into T * N residues (tower-major),
// refusing a wrong size or a residue not below its tower's modulus (InvalidUpdateError).
std::vector<uint64_t> decode_partial(const uint8_t* packed, size_t len, uint64_t ring_dim,
                                     const std::vector<uint64_t>& moduli);

// decode_partial, then the residues written into a copy of `tmpl` at the T offsets of
// `layout` (one element: layout.offsets holds one offset per tower).
std::string rebuild_partial(const uint8_t* packed, size_t len, const uint8_t* tmpl,
                            size_t tmpl_len, const CiphertextLayout& layout);

}  // namespace fedshield
