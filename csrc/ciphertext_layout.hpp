// OpenFHE's binary ciphertext serialization, as far as fedshield needs it: the positions of the
// RNS residue arrays of c0 and c1 (each N little-endian uint64 preceded by its uint64 length),
// one array per tower (RNS modulus q_i) and element: c0 tower 0..T-1, then c1 tower 0..T-1.
// Everything else in a fresh ciphertext of one context is identical from one ciphertext to the
// next, so it is kept once as a template and only the residues travel.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace fedshield {

// At most this many RNS towers (the wire format's n_towers byte; fedshield uses 1 or 3).
constexpr size_t kMaxTowers = 8;

struct CiphertextLayout {
    uint64_t ring_dim = 0;
    std::vector<uint64_t> moduli;   // q_0 .. q_{T-1}, in serialization order
    // Byte offsets of the first residue of each array: c0 towers 0..T-1, then c1 towers.
    std::vector<uint64_t> offsets;
    uint64_t total_size = 0;

    size_t towers() const { return moduli.size(); }
    uint64_t residues_per_ciphertext() const { return 2 * ring_dim * moduli.size(); }
};

// Checks a list of tower moduli: 1..kMaxTowers distinct odd moduli in [3, 2^62).
// Throws InvalidUpdateError naming `what`.
void check_moduli(const std::vector<uint64_t>& moduli, const char* what);

// Every non-overlapping run of "uint64 ring_dim, then ring_dim uint64 values below the largest
// modulus" in an OpenFHE BINARY serialization; the k-th run must hold values below
// moduli[k % T] (runs cycle through the towers). Returns the offsets of their first residues,
// which must number exactly `expected` (else InvalidUpdateError naming `what`).
// Bounds-checked; ring_dim must be in [1, 2^17].
std::vector<uint64_t> find_residue_arrays(const uint8_t* data, size_t len, uint64_t ring_dim,
                                          const std::vector<uint64_t>& moduli, const char* what,
                                          size_t expected);

// Finds the 2T residue arrays of a ciphertext (c0 and c1, T towers each).
CiphertextLayout locate_residues(const uint8_t* data, size_t len, uint64_t ring_dim,
                                 const std::vector<uint64_t>& moduli);

// Checks that a layout (which may come from outside: a context file) fits a `len`-byte
// serialized ciphertext: moduli valid, `elements` * T arrays in order (2: c0 and c1; 1: a
// partial decryption), inside the buffer, not overlapping.
void check_layout(const CiphertextLayout& layout, size_t len, size_t elements = 2);

// Copies the residues of c0 then c1 (2 * T * ring_dim values, tower-major within each element)
// out of a serialized ciphertext; each must be below its tower's modulus.
void extract_residues(const uint8_t* data, size_t len, const CiphertextLayout& layout,
                      uint64_t* out);

// Writes 2 * T * ring_dim residues into a copy of the template bytes.
void write_residues(uint8_t* data, size_t len, const CiphertextLayout& layout,
                    const uint64_t* residues);

}  // namespace fedshield
