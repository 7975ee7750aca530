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

// header.payload_len is filled in; header.n_ciphertexts must equal cts.size().
std::string encode_ciphertexts(UpdateHeader header, const std::vector<ByteView>& cts,
                               const CiphertextLayout& layout, unsigned threads);

// Parses and validates an update, then rebuilds each ciphertext from the template.
std::vector<std::string> decode_ciphertexts(const uint8_t* data, size_t len,
                                            const uint8_t* tmpl, size_t tmpl_len,
                                            const CiphertextLayout& layout, unsigned threads);

}  // namespace fedshield
