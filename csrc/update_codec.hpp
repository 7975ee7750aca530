// Client side of the wire format: serialized OpenFHE ciphertexts -> update bytes (residues
// only, bit-packed) and back, using a template ciphertext for every non-residue byte.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "ciphertext_layout.hpp"
#include "wire.hpp"

namespace fedshield {

struct ByteView {
    const uint8_t* data;
    size_t len;
};

// The header of an update carrying `cts` (payload_len filled in, everything validated).
UpdateHeader ciphertexts_header(UpdateHeader header, const std::vector<ByteView>& cts,
                                const CiphertextLayout& layout);

// Writes the whole update for `cts` into out (update_size(header) bytes), header from
// ciphertexts_header(). A seeded header (elements 1) packs c0 only and writes `seed`
// (kSeedSize bytes) after the payload; otherwise seed is unused.
void encode_ciphertexts(const UpdateHeader& header, const std::vector<ByteView>& cts,
                        const CiphertextLayout& layout, unsigned threads, uint8_t* out,
                        const uint8_t* seed);

// Parses and validates an update, then rebuilds each ciphertext from the template. A seeded
// update's c1 comes from `c1` (n_ciphertexts runs of T * ring_dim residues: the sum of its
// seeds' expansions, below each tower's modulus); c1 is unused (may be null) otherwise.
std::vector<std::string> decode_ciphertexts(const uint8_t* data, size_t len,
                                            const uint8_t* tmpl, size_t tmpl_len,
                                            const CiphertextLayout& layout, unsigned threads,
                                            const uint64_t* c1, size_t c1_len);

}  // namespace fedshield
