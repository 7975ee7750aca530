// Four independent multiply-rotate lanes over 32-byte stripes, then an avalanche finish.
// The lane round and the constants follow the well-known xxHash64 construction.
#include "checksum.hpp"

#include <cstring>
#include <vector>

#include "parallel.hpp"

namespace fedshield {
namespace {

constexpr uint64_t P1 = 0x9E3779B185EBCA87ULL;
constexpr uint64_t P2 = 0xC2B2AE3D27D4EB4FULL;
constexpr uint64_t P3 = 0x165667B19E3779F9ULL;
constexpr uint64_t P4 = 0x85EBCA77C2B2CA63ULL;
constexpr uint64_t P5 = 0x27D4EB2F165667C5ULL;

inline uint64_t rotl(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }

inline uint64_t load64(const uint8_t* p) {
    uint64_t v;
    std::memcpy(&v, p, sizeof v);  // little-endian hosts only (checked in CMakeLists)
    return v;
}

inline uint64_t lane(uint64_t acc, uint64_t word) {
    acc += word * P2;
    acc = rotl(acc, 31);
    return acc * P1;
}

inline uint64_t merge(uint64_t acc, uint64_t v) {
    acc ^= lane(0, v);
    return acc * P1 + P4;
}

}  // namespace

uint64_t checksum64(const uint8_t* data, size_t len, uint64_t seed) {
    const uint8_t* p = data;
    const uint8_t* end = data + len;
    uint64_t h;
    if (len >= 32) {
        uint64_t v1 = seed + P1 + P2, v2 = seed + P2, v3 = seed, v4 = seed - P1;
        const uint8_t* limit = end - 32;
        do {
            v1 = lane(v1, load64(p));
            v2 = lane(v2, load64(p + 8));
            v3 = lane(v3, load64(p + 16));
            v4 = lane(v4, load64(p + 24));
            p += 32;
        } while (p <= limit);
        h = rotl(v1, 1) + rotl(v2, 7) + rotl(v3, 12) + rotl(v4, 18);
        h = merge(h, v1);
        h = merge(h, v2);
        h = merge(h, v3);
        h = merge(h, v4);
    } else {
        h = seed + P5;
    }
    h += static_cast<uint64_t>(len);
    for (; p + 8 <= end; p += 8) {
        h ^= lane(0, load64(p));
        h = rotl(h, 27) * P1 + P4;
    }
    if (p + 4 <= end) {
        uint32_t w;
        std::memcpy(&w, p, 4);
        h ^= static_cast<uint64_t>(w) * P1;
        h = rotl(h, 23) * P2 + P3;
        p += 4;
    }
    for (; p < end; ++p) {
        h ^= static_cast<uint64_t>(*p) * P5;
        h = rotl(h, 11) * P1;
    }
    h ^= h >> 33;
    h *= P2;
    h ^= h >> 29;
    h *= P3;
    h ^= h >> 32;
    return h;
}

uint64_t wire_checksum(const uint8_t* data, size_t len, unsigned threads) {
    if (len <= kChecksumChunk) return checksum64(data, len);
    const size_t n_chunks = (len + kChecksumChunk - 1) / kChecksumChunk;
    std::vector<uint64_t> chunk_sums(n_chunks);
    parallel_ranges(n_chunks, threads, 1, [&](unsigned, uint64_t begin, uint64_t end) {
        for (uint64_t i = begin; i < end; ++i) {
            const size_t at = i * kChecksumChunk;
            const size_t n = std::min(kChecksumChunk, len - at);
            chunk_sums[i] = checksum64(data + at, n, i);
        }
    });
    return checksum64(reinterpret_cast<const uint8_t*>(chunk_sums.data()), n_chunks * 8, len);
}

}  // namespace fedshield
