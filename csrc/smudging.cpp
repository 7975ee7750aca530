#include "smudging.hpp"

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "aes_ctr.hpp"
#include "errors.hpp"
#include "modarith.hpp"
#include "secure_wipe.hpp"

namespace fedshield {
namespace {

using f128 = __float128;

// e^-x for x in [0, 1] in binary128: the Taylor series (the 40th term is below 2^-150).
f128 exp_neg_unit(f128 x) {
    f128 term = 1, sum = 1;
    for (int k = 1; k <= 40; ++k) {
        term = term * x / k;
        sum += (k & 1) ? -term : term;
    }
    return sum;
}

// e^-(num / 2^41) = e^-frac * (e^-1)^whole, num < 2^64.
f128 exp_neg_scaled(uint64_t num) {
    static const f128 e_inv = exp_neg_unit(1);
    const uint64_t whole = num >> 41;
    const f128 frac = static_cast<f128>(num & ((uint64_t{1} << 41) - 1)) /
                      static_cast<f128>(uint64_t{1} << 41);
    f128 r = exp_neg_unit(frac);
    for (uint64_t i = 0; i < whole; ++i) r *= e_inv;
    return r;
}

struct Table {
    int64_t hi[kSmudgingTable], lo[kSmudgingTable];  // 63-bit halves of the thresholds
    int32_t top[kSmudgingTable];  // their top 31 bits (hi >> 32), what the fast scan compares
    int scan;  // thresholds the fast scan compares: up to the first top of 2^31 - 1
};

// The conditions of the convolution (smudging.hpp), checked once: a wrong constant throws
// instead of sampling from another distribution.
void check_levels() {
    const long double pi = 3.14159265358979323846264338327950288L;
    const long double eta = std::sqrt(std::log(2.0L + std::ldexp(2.0L, kSmudgingEpsBits)) / pi) /
                            std::sqrt(2 * pi);  // eta_eps(Z) in units of sigma
    uint64_t product = 1;
    long double sigma = std::sqrt(std::ldexp(1.0L, 40) / kSmudgingBaseDivisor);
    for (const auto& level : kSmudgingLevels) {
        const uint64_t z = level[0], w = level[1];
        if (z != w + 1 || sigma < std::sqrt(2.0L) * z * eta)
            throw ParameterInputError("smudging: level (" + std::to_string(z) + ", " +
                                      std::to_string(w) + ") breaks the convolution's conditions");
        product *= z * z + w * w;
        sigma *= std::sqrt(static_cast<long double>(z * z + w * w));
    }
    if (product != kSmudgingBaseDivisor)
        throw ParameterInputError("smudging: the levels do not give variance 2^40");
}

Table build_table() {
    check_levels();
    // weights of |y| = k: 1 for 0, 2 e^(-k^2 / (2 sigma0^2)) = 2 e^(-k^2 D / 2^41) beyond
    constexpr int kTerms = 2 * kSmudgingTable;
    std::vector<f128> cumulative(kTerms + 1);
    f128 total = 0;
    for (int k = 0; k <= kTerms; ++k) {
        const uint64_t num = static_cast<uint64_t>(k) * k * kSmudgingBaseDivisor;
        total += k == 0 ? f128(1) : 2 * exp_neg_scaled(num);
        cumulative[k] = total;
    }
    const f128 two63 = static_cast<f128>(uint64_t{1} << 63);
    const f128 tail = (total - cumulative[kSmudgingTable]) / total;
    if (!(tail < 1 / (two63 * two63 / static_cast<f128>(uint64_t{1} << 26))))  // 2^-100
        throw ParameterInputError("smudging: the base table leaves a tail above 2^-100");
    Table t;
    for (int k = 0; k < kSmudgingTable; ++k) {
        const f128 x = cumulative[k] / total * two63;  // < 2^63
        uint64_t hi = static_cast<uint64_t>(x);
        uint64_t lo = static_cast<uint64_t>((x - static_cast<f128>(hi)) * two63);
        const uint64_t top = (uint64_t{1} << 63) - 1;
        if (hi > top || lo > top) hi = lo = top;  // rounds to 1: counted only by u = its value
        t.hi[k] = static_cast<int64_t>(hi);
        t.lo[k] = static_cast<int64_t>(lo);
        t.top[k] = static_cast<int32_t>(hi >> 32);
    }
    // Past the first top of 2^31 - 1 every top is 2^31 - 1 (the thresholds rise): a word's
    // top 31 bits are below them all, or equal, which the scan of that first one reports as
    // a tie. So the scan stops there.
    constexpr int32_t kFull = INT32_MAX;
    t.scan = kSmudgingTable;
    for (int k = 0; k < kSmudgingTable; ++k) {
        if (k > 0 && t.top[k] < t.top[k - 1])
            throw ParameterInputError("smudging: the base table's thresholds do not rise");
        if (t.top[k] == kFull && t.scan == kSmudgingTable) t.scan = k + 1;
    }
    return t;
}

const Table& table() {
    static const Table t = build_table();
    return t;
}

// Base draws from uniform words, the fast scan: |y| = the number of thresholds whose top 31
// bits are below the word's, in 32-bit lanes (eight per AVX2 register where the full 63-bit
// compare has four) and over the first t.scan thresholds only (about 68 of 126). Where the
// word's top 31 bits equal a threshold's, that count may be off: ties[i] says so (the caller
// settles it with every bit). Every entry is compared for every draw: no early exit, no
// look-up by value.
FEDSHIELD_SIMD_CLONES
void base_block(const uint64_t* __restrict__ words, int64_t* __restrict__ mags,
                int32_t* __restrict__ ties, size_t count, const int32_t* __restrict__ top,
                int scan) {
    constexpr size_t kLane = 32;  // draws compared together: four registers of each array
    int32_t u[kLane], acc[kLane], tie[kLane];
    for (size_t at = 0; at < count; at += kLane) {
        const size_t m = count - at < kLane ? count - at : kLane;
        for (size_t i = 0; i < kLane; ++i) {
            u[i] = i < m ? static_cast<int32_t>(words[at + i] >> 33) : 0;
            acc[i] = 0;
            tie[i] = 0;
        }
        for (int k = 0; k < scan; ++k) {
            const int32_t c = top[k];
            for (size_t i = 0; i < kLane; ++i) {
                acc[i] -= -static_cast<int32_t>(u[i] > c);  // as masks: vectorises best
                tie[i] |= -static_cast<int32_t>(u[i] == c);
            }
        }
        for (size_t i = 0; i < m; ++i) {
            mags[at + i] = acc[i];
            ties[at + i] = tie[i];
        }
    }
    secure_wipe(u, sizeof u);  // each block overwrote the last: the draws' bits end here
    secure_wipe(acc, sizeof acc);
}

// The exact count for one word, every bit of every threshold compared (extra: 63 more
// uniform bits for the low halves; they matter only when the word's 63 bits equal a high
// half).
int64_t settle_tie(uint64_t word, uint64_t extra, const Table& t) {
    const int64_t u = static_cast<int64_t>(word >> 1), v = static_cast<int64_t>(extra >> 1);
    int64_t count = 0;
    for (int k = 0; k < kSmudgingTable; ++k)
        count += static_cast<int64_t>(t.hi[k] < u) |
                 (static_cast<int64_t>(t.hi[k] == u) & static_cast<int64_t>(t.lo[k] <= v));
    return count;
}

// Ties (probability below t.scan * 2^-31, below 2^-24 per draw) are settled without
// revealing which draws tied, or whether any did: the block's first and last tie are found by
// masked passes over every draw (none: positions no draw has), their words gathered, settled
// with fresh bits and written back the same way, whether or not there was a tie. Only a block
// with more than two ties (probability below 2^-44 for a block of 2048 draws) needs the
// caller's plain loop, the one step whose time depends on the draws.
struct TieSlots {
    int64_t at[2];      // first and last tie: count and -1 when there is none
    uint64_t word[2];   // their words (0 when there is none)
    int64_t count;      // ties in the block
};

FEDSHIELD_SIMD_CLONES
TieSlots find_ties(const uint64_t* __restrict__ words, const int32_t* __restrict__ ties,
                   size_t count) {
    // masked maxima (no select to carry from one draw to the next: they vectorise): the last
    // tie is max((i + 1) & tie) - 1, the first count - max((count - i) & tie)
    const int32_t n = static_cast<int32_t>(count);
    int32_t after_last = 0, before_first = 0, total = 0;
    for (size_t i = 0; i < count; ++i) {
        const int32_t at = static_cast<int32_t>(i), tie = ties[i];
        after_last = std::max(after_last, (at + 1) & tie);
        before_first = std::max(before_first, (n - at) & tie);
        total -= tie;
    }
    const int64_t first = n - before_first, last = after_last - 1;
    uint64_t w0 = 0, w1 = 0;
    for (size_t i = 0; i < count; ++i) {
        const int64_t at = static_cast<int64_t>(i);
        w0 |= words[i] & static_cast<uint64_t>(-static_cast<int64_t>(at == first));
        w1 |= words[i] & static_cast<uint64_t>(-static_cast<int64_t>(at == last));
    }
    return TieSlots{{first, last}, {w0, w1}, total};
}

FEDSHIELD_SIMD_CLONES
void put_settled(int64_t* __restrict__ y, size_t count, const TieSlots& slots,
                 const int64_t* exact) {
    for (size_t i = 0; i < count; ++i) {
        const int64_t at = static_cast<int64_t>(i);
        const int64_t p0 = -static_cast<int64_t>(at == slots.at[0]);
        const int64_t p1 = -static_cast<int64_t>(at == slots.at[1]);
        const int64_t v = (exact[0] & p0) | (y[i] & ~p0);
        y[i] = (exact[1] & p1) | (v & ~p1);
    }
}

// Signed base draws into y from count uniform words: magnitudes from the table, the sign
// from bit 0. ``extra`` gives the bits a settled tie draws (the generator in production, a
// fixed list in the tests).
template <typename Extra>
void base_from_words(const uint64_t* words, int64_t* y, int32_t* ties, size_t count,
                     const Table& t, Extra extra) {
    base_block(words, y, ties, count, t.top, t.scan);
    const TieSlots slots = find_ties(words, ties, count);
    const int64_t exact[2] = {settle_tie(slots.word[0], extra(), t),
                              settle_tie(slots.word[1], extra(), t)};
    put_settled(y, count, slots, exact);
    if (slots.count > 2)
        for (size_t i = 0; i < count; ++i)  // more ties than the masked passes settle
            if (ties[i]) y[i] = settle_tie(words[i], extra(), t);
    for (size_t i = 0; i < count; ++i) {
        const int64_t sign = static_cast<int64_t>(words[i] & 1);
        y[i] = (y[i] ^ -sign) + sign;  // -0 is 0: both signs of 0 give 0, as they must
    }
}

void base_draws(FastRandom& rng, int64_t* y, size_t count, std::vector<uint64_t>& words,
                std::vector<int32_t>& ties) {
    rng.fill(words.data(), count);
    base_from_words(words.data(), y, ties.data(), count, table(), [&rng] { return rng.next(); });
}

constexpr size_t kChunk = 256;  // samples per round of draws

}  // namespace

void sample_smudging(FastRandom& rng, int64_t* out, size_t n) {
    constexpr size_t kDraws = 8;
    std::vector<uint64_t> words(kDraws * kChunk);
    std::vector<int32_t> ties(kDraws * kChunk);
    std::vector<int64_t> y(kDraws * kChunk);
    const auto level = [](int i, int j) { return static_cast<int64_t>(kSmudgingLevels[i][j]); };
    const int64_t z1 = level(0, 0), w1 = level(0, 1), z2 = level(1, 0), w2 = level(1, 1);
    const int64_t z3 = level(2, 0), w3 = level(2, 1);
    for (size_t at = 0; at < n; at += kChunk) {
        const size_t m = n - at < kChunk ? n - at : kChunk;
        base_draws(rng, y.data(), kDraws * m, words, ties);
        for (size_t i = 0; i < m; ++i) {
            const int64_t* d = y.data() + kDraws * i;
            const int64_t a0 = z1 * d[0] + w1 * d[1], a1 = z1 * d[2] + w1 * d[3];
            const int64_t a2 = z1 * d[4] + w1 * d[5], a3 = z1 * d[6] + w1 * d[7];
            const int64_t b0 = z2 * a0 + w2 * a1, b1 = z2 * a2 + w2 * a3;
            out[at + i] = z3 * b0 + w3 * b1;  // |x| < 1009 * 39 * 7 * 126 < 2^26
        }
    }
    secure_wipe(words);
    secure_wipe(y);
}

void sample_smudging_base(FastRandom& rng, int64_t* out, size_t n) {
    std::vector<uint64_t> words(kChunk);
    std::vector<int32_t> ties(kChunk);
    for (size_t at = 0; at < n; at += kChunk)
        base_draws(rng, out + at, n - at < kChunk ? n - at : kChunk, words, ties);
    secure_wipe(words);
}

void smudging_base_from_words(const uint64_t* words, size_t n, const uint64_t* extra,
                              size_t n_extra, int64_t* out) {
    std::vector<int32_t> ties(n);
    size_t used = 0;
    base_from_words(words, out, ties.data(), n, table(), [&]() {
        if (used == n_extra)
            throw ParameterInputError("smudging: the ties need more than the " +
                                      std::to_string(n_extra) + " extra words given");
        return extra[used++];
    });
}

void smudging_table(uint64_t* hi, uint64_t* lo) {
    const Table& t = table();
    for (int k = 0; k < kSmudgingTable; ++k) {
        hi[k] = static_cast<uint64_t>(t.hi[k]);
        lo[k] = static_cast<uint64_t>(t.lo[k]);
    }
}

}  // namespace fedshield
