#include "bitpack.hpp"

#include <cstring>
#include <utility>

namespace fedshield {

void pack_residues(const uint64_t* residues, uint64_t count, unsigned bits, uint8_t* out) {
    const uint64_t nbytes = packed_bytes(count, bits);
    std::memset(out, 0, nbytes);
    unsigned __int128 acc = 0;
    unsigned nacc = 0;
    uint8_t* p = out;
    const uint64_t mask = bits == 64 ? ~0ULL : ((1ULL << bits) - 1);
    for (uint64_t i = 0; i < count; ++i) {
        acc |= static_cast<unsigned __int128>(residues[i] & mask) << nacc;
        nacc += bits;
        while (nacc >= 64) {
            uint64_t w = static_cast<uint64_t>(acc);
            std::memcpy(p, &w, 8);
            p += 8;
            acc >>= 64;
            nacc -= 64;
        }
    }
    while (nacc > 0) {  // flush the last partial word byte by byte
        *p++ = static_cast<uint8_t>(acc);
        acc >>= 8;
        nacc = nacc >= 8 ? nacc - 8 : 0;
    }
}

namespace {

// Residues of a compile-time width, 8 at a time (8 * BITS bits = BITS bytes, so each group
// starts on a byte boundary and every offset and shift inside it is a constant). Where no
// residue straddles more than 8 bytes (shift + BITS <= 64; shifts are multiples of
// gcd(BITS, 8)), one load per residue suffices; BITS = 60 is such a width.
template <unsigned BITS>
uint64_t unpack_groups(const uint8_t* data, uint64_t len, uint64_t first, uint64_t count,
                       uint64_t* out) {
    constexpr uint64_t mask = (1ULL << BITS) - 1;
    constexpr unsigned g = (BITS % 8 == 0) ? 8 : (BITS % 4 == 0) ? 4 : (BITS % 2 == 0) ? 2 : 1;
    constexpr bool one_load = (8 - g) + BITS <= 64;
    uint64_t i = 0;
    for (; i + 8 <= count; i += 8) {
        const uint64_t base = (first + i) * BITS / 8;
        if (base + BITS + 8 > len) break;  // the last load of the group reads 8 bytes
        const uint8_t* p = data + base;
        for (unsigned j = 0; j < 8; ++j) {
            const unsigned bit = j * BITS;
            uint64_t lo;
            std::memcpy(&lo, p + bit / 8, 8);
            uint64_t v = lo >> (bit % 8);
            if (!one_load && bit % 8) {
                uint64_t hi;
                std::memcpy(&hi, p + bit / 8 + 8, 8);
                v |= hi << (64 - bit % 8);
            }
            out[i + j] = v & mask;
        }
    }
    return i;
}

template <unsigned... B>
uint64_t unpack_fixed(unsigned bits, const uint8_t* data, uint64_t len, uint64_t first,
                      uint64_t count, uint64_t* out, std::integer_sequence<unsigned, B...>) {
    uint64_t done = 0;
    ((bits == B + 40 ? (done = unpack_groups<B + 40>(data, len, first, count, out), true)
                     : false) || ...);
    return done;
}

}  // namespace

void unpack_residues(const uint8_t* data, uint64_t len, uint64_t first, uint64_t count,
                     unsigned bits, uint64_t* out) {
    const uint64_t mask = bits == 64 ? ~0ULL : ((1ULL << bits) - 1);
    // Moduli of 40..62 bits (OpenFHE's first moduli) take the constant-offset path.
    uint64_t i = 0;
    if (bits >= 40 && bits <= 62)
        i = unpack_fixed(bits, data, len, first, count, out,
                         std::make_integer_sequence<unsigned, 23>{});
    if (bits <= 64 - 7) {
        // Every residue lies within the 8 bytes at its first byte (shift <= 7, bits <= 57):
        // one unaligned load and a shift, no loop-carried state.
        for (; i < count; ++i) {
            const uint64_t bit = (first + i) * bits;
            if ((bit >> 3) + 8 > len) break;
            uint64_t w;
            std::memcpy(&w, data + (bit >> 3), 8);
            out[i] = (w >> (bit & 7)) & mask;
        }
    } else {
        // Up to 64 + 7 bits: two overlapping loads (bytes [b, b+8) and [b+8, b+16)).
        for (; i < count; ++i) {
            const uint64_t bit = (first + i) * bits;
            const uint64_t b = bit >> 3;
            if (b + 16 > len) break;
            uint64_t lo, hi;
            std::memcpy(&lo, data + b, 8);
            std::memcpy(&hi, data + b + 8, 8);
            const unsigned s = static_cast<unsigned>(bit & 7);
            const uint64_t v = s ? (lo >> s) | (hi << (64 - s)) : lo;
            out[i] = v & mask;
        }
    }
    // Tail near the end of the buffer: byte at a time, never past len.
    for (; i < count; ++i) {
        const uint64_t bit = (first + i) * bits;
        unsigned __int128 acc = 0;
        const uint64_t b0 = bit >> 3;
        for (unsigned k = 0; k < 9; ++k) {
            const uint64_t b = b0 + k;
            if (b < len) acc |= static_cast<unsigned __int128>(data[b]) << (8 * k);
        }
        out[i] = static_cast<uint64_t>(acc >> (bit & 7)) & mask;
    }
}

}  // namespace fedshield
