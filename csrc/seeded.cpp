#include "seeded.hpp"

#include <cstring>

#include "errors.hpp"
#include "wire.hpp"

namespace fedshield {
namespace {

uint64_t load64(const uint8_t* p) {
    uint64_t v;
    std::memcpy(&v, p, 8);
    return v;
}

void store64(uint8_t* p, uint64_t v) { std::memcpy(p, &v, 8); }

uint64_t mul_mod(uint64_t a, uint64_t b, uint64_t q) {
    return static_cast<uint64_t>((static_cast<unsigned __int128>(a) * b) % q);
}

}  // namespace

bool sample_uniform(const uint8_t* stream, size_t len, uint64_t q, uint64_t n, uint64_t* out) {
    if (q < 3) throw InvalidUpdateError("seeded: modulus " + std::to_string(q) + " is below 3");
    const unsigned bits = bit_length(q);
    const uint64_t mask = bits >= 64 ? ~uint64_t{0} : (uint64_t{1} << bits) - 1;
    uint64_t filled = 0;
    for (size_t at = 0; filled < n && at + 8 <= len; at += 8) {
        const uint64_t v = load64(stream + at) & mask;
        if (v < q) out[filled++] = v;
    }
    return filled == n;
}

void reseed_ciphertext(uint8_t* data, size_t len, const CiphertextLayout& layout,
                       const uint64_t* a, const uint64_t* s) {
    check_layout(layout, len);
    const uint64_t n = layout.ring_dim;
    const size_t towers = layout.towers();
    for (size_t t = 0; t < towers; ++t) {
        const uint64_t q = layout.moduli[t];
        uint8_t* c0 = data + layout.offsets[t];
        uint8_t* c1 = data + layout.offsets[towers + t];
        if (load64(c0 - 8) != n || load64(c1 - 8) != n)
            throw InvalidUpdateError("seeded: residue array lengths moved");
        const uint64_t* at = a + t * n;
        const uint64_t* st = s + t * n;
        for (uint64_t i = 0; i < n; ++i) {
            const uint64_t x0 = load64(c0 + 8 * i), x1 = load64(c1 + 8 * i);
            if (x0 >= q || x1 >= q || at[i] >= q || st[i] >= q)
                throw InvalidUpdateError("seeded: a residue is not below the modulus");
            const uint64_t diff = x1 >= at[i] ? x1 - at[i] : x1 + q - at[i];
            const uint64_t sum = x0 + mul_mod(diff, st[i], q);
            store64(c0 + 8 * i, sum >= q ? sum - q : sum);
            store64(c1 + 8 * i, at[i]);
        }
    }
}

}  // namespace fedshield
