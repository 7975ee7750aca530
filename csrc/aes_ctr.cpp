#include "aes_ctr.hpp"

#include <cpuid.h>
#include <immintrin.h>

#include <cstring>

#include "csprng.hpp"
#include "errors.hpp"
#include "modarith.hpp"
#include "secure_wipe.hpp"
#include "wire.hpp"

namespace fedshield {
namespace {

#define FEDSHIELD_AES __attribute__((target("aes,ssse3,sse4.1")))

// w0, w0^w1, w0^w1^w2, w0^w1^w2^w3 of the four 32-bit words of a round key: the running XOR
// every step of the key schedule applies.
FEDSHIELD_AES inline __m128i prefix_xor(__m128i x) {
    x = _mm_xor_si128(x, _mm_slli_si128(x, 4));
    return _mm_xor_si128(x, _mm_slli_si128(x, 8));
}

FEDSHIELD_AES inline __m128i next_even(__m128i prev, __m128i assist) {
    return _mm_xor_si128(prefix_xor(prev), _mm_shuffle_epi32(assist, 0xff));
}

FEDSHIELD_AES inline __m128i next_odd(__m128i even, __m128i prev) {
    return _mm_xor_si128(prefix_xor(prev),
                         _mm_shuffle_epi32(_mm_aeskeygenassist_si128(even, 0x00), 0xaa));
}

// The AES-256 key schedule (FIPS 197, 5.2): 15 round keys.
FEDSHIELD_AES void expand_key(const uint8_t* key, uint8_t* out) {
    __m128i rk[15];
    rk[0] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(key));
    rk[1] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(key + 16));
#define FS_ROUND(i, rcon)                                                          \
    rk[i] = next_even(rk[i - 2], _mm_aeskeygenassist_si128(rk[i - 1], rcon));      \
    if (i + 1 < 15) rk[i + 1] = next_odd(rk[i], rk[i - 1]);
    FS_ROUND(2, 0x01) FS_ROUND(4, 0x02) FS_ROUND(6, 0x04) FS_ROUND(8, 0x08)
    FS_ROUND(10, 0x10) FS_ROUND(12, 0x20) FS_ROUND(14, 0x40)
#undef FS_ROUND
    for (int i = 0; i < 15; ++i) _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 16 * i), rk[i]);
    secure_wipe(rk, sizeof rk);
}

inline uint64_t load_be64(const uint8_t* p) {
    uint64_t v = 0;
    for (int i = 0; i < 8; ++i) v = (v << 8) | p[i];
    return v;
}

// The counter block's bytes: (hi, lo) big-endian; then the counter moves on by one.
FEDSHIELD_AES inline __m128i next_counter(uint64_t& hi, uint64_t& lo) {
    const __m128i swap = _mm_set_epi8(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m128i v = _mm_set_epi64x(static_cast<long long>(hi), static_cast<long long>(lo));
    if (++lo == 0) ++hi;
    return _mm_shuffle_epi8(v, swap);
}

// Four blocks at a time (the AES units pipeline independent blocks).
FEDSHIELD_AES void ctr_blocks(const uint8_t* round_keys, uint64_t& hi, uint64_t& lo, uint8_t* out,
                              size_t blocks) {
    __m128i rk[15];
    for (int i = 0; i < 15; ++i)
        rk[i] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(round_keys + 16 * i));
#define counter() next_counter(hi, lo)
    size_t b = 0;
    for (; b + 8 <= blocks; b += 8) {  // eight independent blocks keep the AES unit busy
        __m128i x[8];
        for (int i = 0; i < 8; ++i) x[i] = _mm_xor_si128(counter(), rk[0]);
        for (int r = 1; r < 14; ++r)
            for (int i = 0; i < 8; ++i) x[i] = _mm_aesenc_si128(x[i], rk[r]);
        __m128i* o = reinterpret_cast<__m128i*>(out + 16 * b);
        for (int i = 0; i < 8; ++i) _mm_storeu_si128(o + i, _mm_aesenclast_si128(x[i], rk[14]));
    }
    for (; b + 4 <= blocks; b += 4) {
        __m128i x0 = _mm_xor_si128(counter(), rk[0]), x1 = _mm_xor_si128(counter(), rk[0]);
        __m128i x2 = _mm_xor_si128(counter(), rk[0]), x3 = _mm_xor_si128(counter(), rk[0]);
        for (int r = 1; r < 14; ++r) {
            x0 = _mm_aesenc_si128(x0, rk[r]);
            x1 = _mm_aesenc_si128(x1, rk[r]);
            x2 = _mm_aesenc_si128(x2, rk[r]);
            x3 = _mm_aesenc_si128(x3, rk[r]);
        }
        __m128i* o = reinterpret_cast<__m128i*>(out + 16 * b);
        _mm_storeu_si128(o, _mm_aesenclast_si128(x0, rk[14]));
        _mm_storeu_si128(o + 1, _mm_aesenclast_si128(x1, rk[14]));
        _mm_storeu_si128(o + 2, _mm_aesenclast_si128(x2, rk[14]));
        _mm_storeu_si128(o + 3, _mm_aesenclast_si128(x3, rk[14]));
    }
    for (; b < blocks; ++b) {
        __m128i x = _mm_xor_si128(counter(), rk[0]);
        for (int r = 1; r < 14; ++r) x = _mm_aesenc_si128(x, rk[r]);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 16 * b), _mm_aesenclast_si128(x, rk[14]));
    }
    secure_wipe(rk, sizeof rk);
}
#undef counter

#define FEDSHIELD_VAES __attribute__((target("vaes,avx2,aes,ssse3,sse4.1")))

// Whether the CPU has VAES (AES rounds on both 128-bit lanes of a 256-bit register) and the OS
// saves the 256-bit registers (AVX2 as __builtin_cpu_supports reports it). VAES is read from
// CPUID leaf 7 directly: GCC 12's __builtin_cpu_supports("vaes") is false on CPUs without
// AVX-512 (AMD Zen 3) that have it.
bool have_vaes() {
#if defined(__x86_64__) && defined(__GNUC__)
    static const bool yes = [] {
        unsigned a = 0, b = 0, c = 0, d = 0;
        if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
        return (c & (1u << 9)) != 0 && __builtin_cpu_supports("avx2") &&
               __builtin_cpu_supports("aes") && __builtin_cpu_supports("sse4.1");
    }();
    return yes;
#else
    return false;
#endif
}

// ctr_blocks with VAES: sixteen blocks at a time, two per register (the same key stream; the
// low lane holds the earlier counter).
FEDSHIELD_VAES void ctr_blocks_vaes(const uint8_t* round_keys, uint64_t& hi, uint64_t& lo,
                                    uint8_t* out, size_t blocks) {
    __m256i rk[15];
    for (int i = 0; i < 15; ++i)
        rk[i] = _mm256_broadcastsi128_si256(
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(round_keys + 16 * i)));
    size_t b = 0;
    for (; b + 16 <= blocks; b += 16) {
        __m256i x[8];
        for (int i = 0; i < 8; ++i) {
            const __m128i first = next_counter(hi, lo);
            const __m128i second = next_counter(hi, lo);
            x[i] = _mm256_xor_si256(_mm256_set_m128i(second, first), rk[0]);
        }
        for (int r = 1; r < 14; ++r)
            for (int i = 0; i < 8; ++i) x[i] = _mm256_aesenc_epi128(x[i], rk[r]);
        __m256i* o = reinterpret_cast<__m256i*>(out + 16 * b);
        for (int i = 0; i < 8; ++i) _mm256_storeu_si256(o + i, _mm256_aesenclast_epi128(x[i], rk[14]));
    }
    secure_wipe(rk, sizeof rk);
    if (b < blocks) ctr_blocks(round_keys, hi, lo, out + 16 * b, blocks - b);
}

}  // namespace

bool have_aes_ni() {
#if defined(__x86_64__) && defined(__GNUC__)
    return __builtin_cpu_supports("aes") && __builtin_cpu_supports("sse4.1");
#else
    return false;
#endif
}

AesCtr::AesCtr(const uint8_t* key, const uint8_t* counter) {
    if (!have_aes_ni()) throw ParameterInputError("AES-CTR: this CPU has no AES-NI");
    expand_key(key, round_keys_);
    hi_ = load_be64(counter);
    lo_ = load_be64(counter + 8);
}

AesCtr::~AesCtr() {
    secure_wipe(round_keys_, sizeof round_keys_);
    secure_wipe(&hi_, sizeof hi_);
    secure_wipe(&lo_, sizeof lo_);
}

void AesCtr::stream(uint8_t* out, size_t blocks) {
    if (have_vaes())
        ctr_blocks_vaes(round_keys_, hi_, lo_, out, blocks);
    else
        ctr_blocks(round_keys_, hi_, lo_, out, blocks);
}

void expand_uniform(const uint8_t* key, uint64_t k, uint32_t t, uint64_t q, uint64_t n,
                    uint64_t* out, bool accumulate) {
    if (q < 3 || q >= (uint64_t{1} << 62))
        throw ParameterInputError("expand: modulus " + std::to_string(q) + " is not in [3, 2^62)");
    uint8_t counter[16] = {0};
    std::memcpy(counter, &k, 8);   // little-endian host (CMakeLists refuses others)
    std::memcpy(counter + 8, &t, 4);
    AesCtr aes(key, counter);
    const unsigned bits = bit_length(q);
    const uint64_t mask = (uint64_t{1} << bits) - 1;
    constexpr size_t kBlocks = 64;
    uint64_t words[2 * kBlocks];
    uint64_t filled = 0;
    while (filled < n) {
        aes.stream(reinterpret_cast<uint8_t*>(words), kBlocks);
        for (size_t i = 0; i < 2 * kBlocks; ++i) words[i] &= mask;
        if (filled + 2 * kBlocks <= n && !any_not_below(words, 2 * kBlocks, q)) {
            // the common case (q is close to 2^bits): no word of the block is rejected, so
            // the block is the next residues as they are, in one vectorised pass
            if (accumulate)
                add_mod(out + filled, words, 2 * kBlocks, q);
            else
                std::memcpy(out + filled, words, sizeof words);
            filled += 2 * kBlocks;
            continue;
        }
        for (size_t i = 0; i < 2 * kBlocks && filled < n; ++i) {
            const uint64_t v = words[i] & mask;
            if (v < q) {  // a is public: rejection on it leaks nothing
                if (accumulate) {
                    const uint64_t s = out[filled] + v;
                    out[filled] = s >= q ? s - q : s;
                } else {
                    out[filled] = v;
                }
                ++filled;
            }
        }
    }
}

FastRandom::FastRandom() {
    if (have_aes_ni()) {
        uint8_t seed[48];
        random_bytes(seed, sizeof seed);
        aes_ = new AesCtr(seed, seed + 32);
        secure_wipe(seed, sizeof seed);
    }
}

FastRandom::~FastRandom() {
    delete aes_;
    secure_wipe(block_, sizeof block_);
}

void FastRandom::fill(uint64_t* out, size_t n) {
    while (n > 0) {
        if (used_ == kWords) refill();
        const size_t take = n < kWords - used_ ? n : kWords - used_;
        std::memcpy(out, block_ + used_, take * sizeof(uint64_t));
        used_ += take;
        out += take;
        n -= take;
    }
}

void FastRandom::refill() {
    if (aes_ != nullptr)
        aes_->stream(reinterpret_cast<uint8_t*>(block_), kWords / 2);
    else
        random_bytes(reinterpret_cast<uint8_t*>(block_), sizeof block_);
    used_ = 0;
}

}  // namespace fedshield
