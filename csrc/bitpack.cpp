#include "bitpack.hpp"

#include <cstring>

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

void unpack_residues(const uint8_t* data, uint64_t len, uint64_t first, uint64_t count,
                     unsigned bits, uint64_t* out) {
    const uint64_t mask = bits == 64 ? ~0ULL : ((1ULL << bits) - 1);
    uint64_t pos = first * bits / 8;  // byte aligned because first % 8 == 0
    unsigned __int128 acc = 0;
    unsigned nacc = 0;
    for (uint64_t i = 0; i < count; ++i) {
        while (nacc < bits) {
            if (pos + 8 <= len) {
                uint64_t w;
                std::memcpy(&w, data + pos, 8);
                acc |= static_cast<unsigned __int128>(w) << nacc;
                pos += 8;
                nacc += 64;
            } else {  // tail of the buffer: byte at a time, never past len
                uint64_t b = pos < len ? data[pos] : 0;
                acc |= static_cast<unsigned __int128>(b) << nacc;
                pos += 1;
                nacc += 8;
            }
        }
        out[i] = static_cast<uint64_t>(acc) & mask;
        acc >>= bits;
        nacc -= bits;
    }
}

}  // namespace fedshield
