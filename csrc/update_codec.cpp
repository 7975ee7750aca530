#include "update_codec.hpp"

#include <cstring>

#include "bitpack.hpp"
#include "errors.hpp"
#include "parallel.hpp"

namespace fedshield {

UpdateHeader ciphertexts_header(UpdateHeader header, const std::vector<ByteView>& cts,
                                const CiphertextLayout& layout) {
    if (cts.size() != header.n_ciphertexts)
        throw InvalidUpdateError("encode: " + std::to_string(cts.size()) +
                                 " ciphertexts given, header announces " +
                                 std::to_string(header.n_ciphertexts));
    if (layout.ring_dim != header.ring_dim || layout.moduli != header.moduli)
        throw InvalidUpdateError("encode: ciphertext layout does not match the header");
    header.payload_len = header.n_ciphertexts * header.ciphertext_bytes();
    validate_header(header);
    return header;
}

void encode_ciphertexts(const UpdateHeader& header, const std::vector<ByteView>& cts,
                        const CiphertextLayout& layout, unsigned threads, uint8_t* out,
                        const uint8_t* seed) {
    uint8_t* payload = out + header.header_size();
    const uint64_t per_ct = header.residues_per_ciphertext();  // E*T*N on the wire
    const uint64_t n = header.ring_dim;
    parallel_ranges(cts.size(), threads, 1, [&](unsigned, uint64_t begin, uint64_t end) {
        std::vector<uint64_t> residues(layout.residues_per_ciphertext());  // c0 and c1
        for (uint64_t i = begin; i < end; ++i) {
            extract_residues(cts[i].data, cts[i].len, layout, residues.data());
            for (uint64_t r = 0; r < per_ct; r += n)  // one run per element and tower
                pack_residues(residues.data() + r, n, header.bits_of(r),
                              payload + header.byte_offset(i * per_ct + r));
        }
    });
    if (header.seeded()) std::memcpy(payload + header.payload_len, seed, kSeedSize);
    seal_update(header, out, threads);
}

std::vector<std::string> decode_ciphertexts(const uint8_t* data, size_t len,
                                            const uint8_t* tmpl, size_t tmpl_len,
                                            const CiphertextLayout& layout, unsigned threads,
                                            const uint64_t* c1, size_t c1_len) {
    const UpdateHeader h = parse_update(data, len, threads);
    if (layout.ring_dim != h.ring_dim || layout.moduli != h.moduli)
        throw IncompatibleUpdateError("decode: the update's ring_dim/modulus differ from the "
                                      "decrypting context's");
    if (tmpl_len != layout.total_size)
        throw InvalidUpdateError("decode: template size does not match its layout");
    const uint64_t element = h.ring_dim * h.towers();  // residues of one polynomial
    if (h.seeded() && (c1 == nullptr || c1_len != h.n_ciphertexts * element))
        throw InvalidUpdateError("decode: a seeded update needs its expanded c1 (" +
                                 std::to_string(h.n_ciphertexts * element) + " residues), got " +
                                 std::to_string(c1 ? c1_len : 0));
    const uint8_t* payload = data + h.header_size();
    const uint64_t per_ct = h.residues_per_ciphertext();
    const uint64_t full = layout.residues_per_ciphertext();
    std::vector<std::string> out(h.n_ciphertexts);
    parallel_ranges(h.n_ciphertexts, threads, 1, [&](unsigned, uint64_t begin, uint64_t end) {
        std::vector<uint64_t> residues(full);
        for (uint64_t i = begin; i < end; ++i) {
            for (uint64_t r = 0; r < per_ct; r += h.ring_dim) {
                const uint64_t at = h.byte_offset(i * per_ct + r);
                unpack_residues(payload + at, h.payload_len - at, 0, h.ring_dim, h.bits_of(r),
                                residues.data() + r);
            }
            if (h.seeded())
                std::memcpy(residues.data() + element, c1 + i * element, element * 8);
            for (uint64_t block = 0; block < full; block += h.ring_dim) {
                const uint64_t q = h.modulus_of(block);  // one tower per ring_dim residues
                for (uint64_t r = block; r < block + h.ring_dim; ++r)
                    if (residues[r] >= q)
                        throw InvalidUpdateError(
                            "invalid update: a residue is not below the modulus");
            }
            std::string ct(reinterpret_cast<const char*>(tmpl), tmpl_len);
            write_residues(reinterpret_cast<uint8_t*>(&ct[0]), ct.size(), layout, residues.data());
            out[i] = std::move(ct);
        }
    });
    return out;
}

}  // namespace fedshield
