// OpenFHE's binary ciphertext serialization, as far as fedshield needs it: the positions of the
// RNS residue arrays of c0 and c1 (each N little-endian uint64 preceded by its uint64 length).
// Everything else in a fresh ciphertext of one context is identical from one ciphertext to the
// next, so it is kept once as a template and only the residues travel.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace fedshield {

struct CiphertextLayout {
    uint64_t ring_dim = 0;
    uint64_t modulus = 0;
    // Byte offsets of the first residue of c0 and c1 in the serialized ciphertext.
    uint64_t c0_offset = 0;
    uint64_t c1_offset = 0;
    uint64_t total_size = 0;
};

// Every non-overlapping run of "uint64 ring_dim, then ring_dim uint64 values below modulus" in
// an OpenFHE BINARY serialization (a ciphertext has two, a one-tower secret key one); returns
// the offsets of their first residues, which must number exactly `expected` (else
// InvalidUpdateError naming `what`). Bounds-checked; ring_dim must be in [1, 2^17].
std::vector<uint64_t> find_residue_arrays(const uint8_t* data, size_t len, uint64_t ring_dim,
                                          uint64_t modulus, const char* what, size_t expected);

// Finds the two residue arrays: a uint64 equal to ring_dim followed by ring_dim values all
// below modulus. Exactly two non-overlapping arrays must be found, else InvalidUpdateError.
CiphertextLayout locate_residues(const uint8_t* data, size_t len, uint64_t ring_dim,
                                 uint64_t modulus);

// Copies the residues of c0 then c1 (2 * ring_dim values) out of a serialized ciphertext.
void extract_residues(const uint8_t* data, size_t len, const CiphertextLayout& layout,
                      uint64_t* out);

// Writes 2 * ring_dim residues into a copy of the template bytes.
void write_residues(uint8_t* data, size_t len, const CiphertextLayout& layout,
                    const uint64_t* residues);

}  // namespace fedshield
