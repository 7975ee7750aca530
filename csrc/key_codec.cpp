#include "key_codec.hpp"

#include <cstring>

#include "bitpack.hpp"
#include "errors.hpp"
#include "modarith.hpp"
#include "secure_wipe.hpp"
#include "wire.hpp"

namespace fedshield {
namespace {

void check_elements(size_t elements, const char* what) {
    if (elements == 0 || elements > kMaxPolys)
        throw InvalidUpdateError(std::string(what) + ": " + std::to_string(elements) +
                                 " polynomials, expected 1 to " + std::to_string(kMaxPolys));
}

void check_ring_dim(uint64_t ring_dim, const char* what) {
    // a multiple of 8: every tower's packed run starts on a byte
    if (ring_dim == 0 || ring_dim > (1u << 17) || ring_dim % 8 != 0)
        throw InvalidUpdateError(std::string(what) + ": ring_dim " + std::to_string(ring_dim) +
                                 " is not a multiple of 8 in [8, 131072]");
}

}  // namespace

uint64_t packed_polys_bytes(uint64_t ring_dim, const std::vector<uint64_t>& moduli,
                            size_t elements) {
    uint64_t bytes = 0;
    for (uint64_t q : moduli) bytes += packed_bytes(ring_dim, bit_length(q));
    return elements * bytes;
}

std::string encode_polys(const uint8_t* data, size_t len, uint64_t ring_dim,
                         const std::vector<uint64_t>& moduli, size_t elements, const char* what) {
    check_elements(elements, what);
    check_ring_dim(ring_dim, what);
    // find_residue_arrays checks the moduli and every residue against its tower's q
    const std::vector<uint64_t> offsets =
        find_residue_arrays(data, len, ring_dim, moduli, what, elements * moduli.size());
    std::string out(packed_polys_bytes(ring_dim, moduli, elements), '\0');
    auto* dst = reinterpret_cast<uint8_t*>(&out[0]);
    std::vector<uint64_t> residues(ring_dim);
    WipeOnExit<uint64_t> wipe(residues);  // a secret key's residues pass through here
    for (size_t k = 0; k < offsets.size(); ++k) {
        std::memcpy(residues.data(), data + offsets[k], 8 * ring_dim);  // may be unaligned
        const unsigned bits = bit_length(moduli[k % moduli.size()]);
        pack_residues(residues.data(), ring_dim, bits, dst);
        dst += packed_bytes(ring_dim, bits);
    }
    return out;
}

std::vector<uint64_t> decode_polys(const uint8_t* packed, size_t len, uint64_t ring_dim,
                                   const std::vector<uint64_t>& moduli, size_t elements,
                                   const char* what) {
    check_elements(elements, what);
    check_ring_dim(ring_dim, what);
    check_moduli(moduli, what);
    // the size comes from the parameters; only then is anything allocated
    const uint64_t expected = packed_polys_bytes(ring_dim, moduli, elements);
    if (len != expected)
        throw InvalidUpdateError(std::string(what) + ": " + std::to_string(len) +
                                 " bytes, expected " + std::to_string(expected) + " (" +
                                 std::to_string(elements) + " polynomial(s) of " +
                                 std::to_string(moduli.size()) + " tower(s) of " +
                                 std::to_string(ring_dim) + " bit-packed residues)");
    const size_t towers = moduli.size();
    std::vector<uint64_t> residues(elements * towers * ring_dim);
    const uint8_t* at = packed;
    for (size_t k = 0; k < elements * towers; ++k) {
        const uint64_t q = moduli[k % towers];
        const unsigned bits = bit_length(q);
        const uint64_t run = packed_bytes(ring_dim, bits);
        uint64_t* out = residues.data() + k * ring_dim;
        unpack_residues(at, run, 0, ring_dim, bits, out);
        for (uint64_t j = 0; j < ring_dim; ++j)
            if (out[j] >= q) {
                const std::string where = elements == 1
                    ? "" : " of polynomial " + std::to_string(k / towers);
                secure_wipe(residues);
                throw InvalidUpdateError(std::string(what) + ": residue " + std::to_string(j) +
                                         " of tower " + std::to_string(k % towers) + where +
                                         " is " + std::to_string(out[j]) +
                                         ", not below its modulus " + std::to_string(q));
            }
        at += run;
    }
    return residues;
}

std::string pack_polys(const uint64_t* residues, size_t count, uint64_t ring_dim,
                       const std::vector<uint64_t>& moduli, size_t elements, const char* what) {
    check_elements(elements, what);
    check_ring_dim(ring_dim, what);
    check_moduli(moduli, what);
    const size_t towers = moduli.size();
    if (count != elements * towers * ring_dim)
        throw InvalidUpdateError(std::string(what) + ": " + std::to_string(count) +
                                 " residues, expected " +
                                 std::to_string(elements * towers * ring_dim));
    std::string out(packed_polys_bytes(ring_dim, moduli, elements), '\0');
    auto* dst = reinterpret_cast<uint8_t*>(&out[0]);
    for (size_t k = 0; k < elements * towers; ++k) {
        const uint64_t q = moduli[k % towers];
        const uint64_t* run = residues + k * ring_dim;
        if (any_not_below(run, ring_dim, q))
            throw InvalidUpdateError(std::string(what) + ": a residue of tower " +
                                     std::to_string(k % towers) + " is not below its modulus " +
                                     std::to_string(q));
        const unsigned bits = bit_length(q);
        pack_residues(run, ring_dim, bits, dst);
        dst += packed_bytes(ring_dim, bits);
    }
    return out;
}

std::string sum_polys(const std::vector<std::pair<const uint8_t*, size_t>>& runs,
                      uint64_t ring_dim, const std::vector<uint64_t>& moduli, size_t elements,
                      const char* what) {
    if (runs.empty()) throw InvalidUpdateError(std::string(what) + ": nothing to sum");
    std::vector<uint64_t> total = decode_polys(runs[0].first, runs[0].second, ring_dim, moduli,
                                               elements, what);
    const size_t towers = moduli.size();
    for (size_t r = 1; r < runs.size(); ++r) {
        const std::vector<uint64_t> more = decode_polys(runs[r].first, runs[r].second,
                                                        ring_dim, moduli, elements, what);
        for (size_t k = 0; k < elements * towers; ++k)
            add_mod(total.data() + k * ring_dim, more.data() + k * ring_dim, ring_dim,
                    moduli[k % towers]);
    }
    return pack_polys(total.data(), total.size(), ring_dim, moduli, elements, what);
}

std::string rebuild_polys(const uint8_t* packed, size_t len, const uint8_t* tmpl,
                          size_t tmpl_len, const CiphertextLayout& layout, size_t elements,
                          const char* what) {
    check_elements(elements, what);
    std::vector<uint64_t> residues = decode_polys(packed, len, layout.ring_dim, layout.moduli,
                                                  elements, what);
    WipeOnExit<uint64_t> wipe(residues);
    check_layout(layout, tmpl_len, elements);  // offsets inside the template, in order
    std::string out(reinterpret_cast<const char*>(tmpl), tmpl_len);
    const uint64_t n = layout.ring_dim;
    for (size_t k = 0; k < layout.offsets.size(); ++k) {
        uint64_t words;
        std::memcpy(&words, tmpl + layout.offsets[k] - 8, 8);
        if (words != n)
            throw InvalidUpdateError(std::string(what) + ": the template's residue array " +
                                     std::to_string(k) + " does not hold " + std::to_string(n) +
                                     " residues (a template of another context?)");
        std::memcpy(&out[layout.offsets[k]], residues.data() + k * n, 8 * n);
    }
    return out;
}

}  // namespace fedshield
