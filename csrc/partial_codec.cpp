#include "partial_codec.hpp"

#include "key_codec.hpp"

namespace fedshield {

// A partial decryption is one polynomial: the key codec's E = 1.
uint64_t partial_bytes(uint64_t ring_dim, const std::vector<uint64_t>& moduli) {
    return packed_polys_bytes(ring_dim, moduli, 1);
}

std::string encode_partial(const uint8_t* data, size_t len, uint64_t ring_dim,
                           const std::vector<uint64_t>& moduli) {
    return encode_polys(data, len, ring_dim, moduli, 1, "partial decryption");
}

std::vector<uint64_t> decode_partial(const uint8_t* packed, size_t len, uint64_t ring_dim,
                                     const std::vector<uint64_t>& moduli) {
    return decode_polys(packed, len, ring_dim, moduli, 1, "partial decryption");
}

std::string rebuild_partial(const uint8_t* packed, size_t len, const uint8_t* tmpl,
                            size_t tmpl_len, const CiphertextLayout& layout) {
    return rebuild_polys(packed, len, tmpl, tmpl_len, layout, 1, "partial decryption");
}

}  // namespace fedshield
