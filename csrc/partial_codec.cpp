#include "partial_codec.hpp"

#include <cstring>

#include "bitpack.hpp"
#include "errors.hpp"
#include "wire.hpp"

namespace fedshield {

uint64_t partial_bytes(uint64_t ring_dim, const std::vector<uint64_t>& moduli) {
    uint64_t bytes = 0;
    for (uint64_t q : moduli) bytes += packed_bytes(ring_dim, bit_length(q));
    return bytes;
}

std::string encode_partial(const uint8_t* data, size_t len, uint64_t ring_dim,
                           const std::vector<uint64_t>& moduli) {
    // find_residue_arrays checks ring_dim, the moduli and every residue against its tower's q
    const std::vector<uint64_t> offsets =
        find_residue_arrays(data, len, ring_dim, moduli, "partial decryption", moduli.size());
    std::string out(partial_bytes(ring_dim, moduli), '\0');
    auto* dst = reinterpret_cast<uint8_t*>(&out[0]);
    std::vector<uint64_t> residues(ring_dim);
    for (size_t i = 0; i < moduli.size(); ++i) {
        std::memcpy(residues.data(), data + offsets[i], 8 * ring_dim);  // may be unaligned
        const unsigned bits = bit_length(moduli[i]);
        pack_residues(residues.data(), ring_dim, bits, dst);
        dst += packed_bytes(ring_dim, bits);
    }
    return out;
}

std::vector<uint64_t> decode_partial(const uint8_t* packed, size_t len, uint64_t ring_dim,
                                     const std::vector<uint64_t>& moduli) {
    if (ring_dim == 0 || ring_dim > (1u << 17) || ring_dim % 8 != 0)
        throw InvalidUpdateError("partial decryption: ring_dim " + std::to_string(ring_dim) +
                                 " is not a multiple of 8 in [8, 131072]");
    check_moduli(moduli, "partial decryption");
    const uint64_t expected = partial_bytes(ring_dim, moduli);
    if (len != expected)
        throw InvalidUpdateError("partial decryption: " + std::to_string(len) +
                                 " bytes, expected " + std::to_string(expected) + " (" +
                                 std::to_string(moduli.size()) + " tower(s) of " +
                                 std::to_string(ring_dim) + " bit-packed residues)");
    std::vector<uint64_t> residues(moduli.size() * ring_dim);
    const uint8_t* at = packed;
    for (size_t i = 0; i < moduli.size(); ++i) {
        const unsigned bits = bit_length(moduli[i]);
        const uint64_t run = packed_bytes(ring_dim, bits);
        uint64_t* out = residues.data() + i * ring_dim;
        unpack_residues(at, run, 0, ring_dim, bits, out);
        for (uint64_t j = 0; j < ring_dim; ++j)
            if (out[j] >= moduli[i])
                throw InvalidUpdateError("partial decryption: residue " + std::to_string(j) +
                                         " of tower " + std::to_string(i) + " is " +
                                         std::to_string(out[j]) + ", not below its modulus " +
                                         std::to_string(moduli[i]));
        at += run;
    }
    return residues;
}

std::string rebuild_partial(const uint8_t* packed, size_t len, const uint8_t* tmpl,
                            size_t tmpl_len, const CiphertextLayout& layout) {
    const std::vector<uint64_t> residues = decode_partial(packed, len, layout.ring_dim,
                                                          layout.moduli);
    check_layout(layout, tmpl_len, 1);  // offsets inside the template, in order
    std::string out(reinterpret_cast<const char*>(tmpl), tmpl_len);
    for (size_t i = 0; i < layout.offsets.size(); ++i)
        std::memcpy(&out[layout.offsets[i]], residues.data() + i * layout.ring_dim,
                    8 * layout.ring_dim);
    return out;
}

}  // namespace fedshield
