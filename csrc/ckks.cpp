#include "ckks.hpp"

#include <cmath>
#include <cstring>
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif
#include <map>
#include <memory>
#include <mutex>

#include "aes_ctr.hpp"
#include "bitpack.hpp"
#include "csprng.hpp"
#include "discrete_gaussian.hpp"
#include "errors.hpp"
#include "flood.hpp"
#include "modarith.hpp"
#include "parallel.hpp"
#include "partial_codec.hpp"
#include "secure_wipe.hpp"
#include "shamir.hpp"
#include "smudging.hpp"

namespace fedshield {
namespace {

using u128 = unsigned __int128;

[[noreturn]] void bad_arg(const std::string& what) { throw ParameterInputError("ckks: " + what); }

// Branch-free modular helpers (inputs below q < 2^62): the compiler sees masks, not branches.
inline uint64_t csub(uint64_t x, uint64_t q) { return x - (q & (0 - static_cast<uint64_t>(x >= q))); }
inline uint64_t add_q(uint64_t a, uint64_t b, uint64_t q) { return csub(a + b, q); }
inline uint64_t sub_q(uint64_t a, uint64_t b, uint64_t q) { return csub(a + q - b, q); }

// Shoup multiplication by a fixed w < q: w_shoup = floor(w * 2^64 / q).
inline uint64_t shoup_of(uint64_t w, uint64_t q) {
    return static_cast<uint64_t>((static_cast<u128>(w) << 64) / q);
}
inline uint64_t mul_shoup(uint64_t a, uint64_t w, uint64_t w_shoup, uint64_t q) {
    const uint64_t hi = static_cast<uint64_t>((static_cast<u128>(a) * w_shoup) >> 64);
    return csub(a * w - hi * q, q);
}

// r mod q for |r| < 2^63, as a residue in [0, q) (Barrett with mu = floor(2^64 / q)).
inline uint64_t signed_mod(int64_t r, uint64_t q, uint64_t mu) {
    const uint64_t neg = 0 - static_cast<uint64_t>(r < 0);
    const uint64_t mag = (static_cast<uint64_t>(r) ^ neg) - neg;
    const uint64_t quot = static_cast<uint64_t>((static_cast<u128>(mag) * mu) >> 64);
    const uint64_t rem = csub(mag - quot * q, q);
    // -rem mod q: q - rem, and 0 stays 0
    const uint64_t flipped = csub(q - rem, q);
    return (rem & ~neg) | (flipped & neg);
}

// --- the special FFT of CKKS over OpenFHE's rotation group ----------------------------------

struct FftTables {
    size_t slots = 0, m = 0;
    // The twiddles of each butterfly level in the order the level reads them (re, im
    // interleaved): the level of half-length h holds h of them from index h - 1. Read in
    // sequence, not gathered from a table of every 2N-th root of unity (cache misses).
    std::vector<double> fwd, inv;
    std::vector<uint32_t> rev;     // bit reversal over log2(slots) bits
};

std::shared_ptr<const FftTables> fft_tables(size_t n) {
    static std::mutex lock;
    static std::map<size_t, std::shared_ptr<const FftTables>> cache;
    std::lock_guard<std::mutex> guard(lock);
    auto it = cache.find(n);
    if (it != cache.end()) return it->second;
    auto t = std::make_shared<FftTables>();
    t->slots = n / 2;
    t->m = 2 * n;
    std::vector<uint64_t> rot(t->slots);  // 5^j mod m
    uint64_t g = 1;
    for (size_t j = 0; j < t->slots; ++j) {
        rot[j] = g;
        g = g * 5 % t->m;
    }
    std::vector<double> re(t->m + 1), im(t->m + 1);  // exp(2 pi i k / m), k in [0, m]
    for (size_t k = 0; k <= t->m; ++k) {
        const long double angle = 2.0L * 3.14159265358979323846264338327950288L * k / t->m;
        re[k] = static_cast<double>(std::cos(angle));
        im[k] = static_cast<double>(std::sin(angle));
    }
    t->fwd.resize(2 * t->slots);
    t->inv.resize(2 * t->slots);
    for (size_t len = 2; len <= t->slots; len <<= 1) {
        const size_t half = len >> 1, lenq = len << 2, gap = t->m / lenq;
        for (size_t j = 0; j < half; ++j) {
            const size_t kf = (rot[j] & (lenq - 1)) * gap;
            const size_t ki = (lenq - (rot[j] & (lenq - 1))) * gap;
            t->fwd[2 * (half - 1 + j)] = re[kf];
            t->fwd[2 * (half - 1 + j) + 1] = im[kf];
            t->inv[2 * (half - 1 + j)] = re[ki];
            t->inv[2 * (half - 1 + j) + 1] = im[ki];
        }
    }
    unsigned bits = 0;
    while ((size_t{1} << bits) < t->slots) ++bits;
    t->rev.resize(t->slots);
    for (size_t i = 0; i < t->slots; ++i) {
        size_t r = 0;
        for (unsigned b = 0; b < bits; ++b) r |= ((i >> b) & 1) << (bits - 1 - b);
        t->rev[i] = static_cast<uint32_t>(r);
    }
    cache.emplace(n, t);
    return t;
}

void bit_reverse(double* v, const FftTables& t) {
    for (size_t i = 0; i < t.slots; ++i) {
        const size_t r = t.rev[i];
        if (i < r) {
            std::swap(v[2 * i], v[2 * r]);
            std::swap(v[2 * i + 1], v[2 * r + 1]);
        }
    }
}

// One butterfly of fft_special: (a, b) -> (a + b w, a - b w), complex, re/im interleaved.
inline void forward_butterfly(double* a, double* b, double wr, double wi) {
    const double xr = b[0] * wr - b[1] * wi, xi = b[0] * wi + b[1] * wr;
    b[0] = a[0] - xr;
    b[1] = a[1] - xi;
    a[0] += xr;
    a[1] += xi;
}

// One butterfly of fft_special_inv: (a, b) -> (a + b, (a - b) w).
inline void inverse_butterfly(double* a, double* b, double wr, double wi) {
    const double ur = a[0] + b[0], ui = a[1] + b[1];
    const double dr = a[0] - b[0], di = a[1] - b[1];
    a[0] = ur;
    a[1] = ui;
    b[0] = dr * wr - di * wi;
    b[1] = dr * wi + di * wr;
}

// The inverse transform's last step: bit reversal and the 1/slots scaling.
void finish_inverse(double* v, const FftTables& t) {
    bit_reverse(v, t);
    const double inv = 1.0 / static_cast<double>(t.slots);
    for (size_t i = 0; i < 2 * t.slots; ++i) v[i] *= inv;
}

// v (slots complex values, re/im interleaved): coefficients -> slot values (decoding).
void fft_special(double* v, const FftTables& t) {
    bit_reverse(v, t);
    for (size_t len = 2; len <= t.slots; len <<= 1) {
        const size_t half = len >> 1;
        const double* tw = t.fwd.data() + 2 * (half - 1);
        for (size_t i = 0; i < t.slots; i += len) {
            for (size_t j = 0; j < half; ++j) {
                double* a = v + 2 * (i + j);
                double* b = v + 2 * (i + j + half);
                forward_butterfly(a, b, tw[2 * j], tw[2 * j + 1]);
            }
        }
    }
}

// The inverse of fft_special (encoding): slot values -> coefficients.
void fft_special_inv(double* v, const FftTables& t) {
    for (size_t len = t.slots; len >= 2; len >>= 1) {
        const size_t half = len >> 1;
        const double* tw = t.inv.data() + 2 * (half - 1);
        for (size_t i = 0; i < t.slots; i += len) {
            for (size_t j = 0; j < half; ++j) {
                double* a = v + 2 * (i + j);
                double* b = v + 2 * (i + j + half);
                inverse_butterfly(a, b, tw[2 * j], tw[2 * j + 1]);
            }
        }
    }
    finish_inverse(v, t);
}

#if defined(__x86_64__) && defined(__GNUC__)
#define FEDSHIELD_AVX2 __attribute__((target("avx2")))

bool have_avx2() {
    static const bool yes = __builtin_cpu_supports("avx2");
    return yes;
}

// b * w for two complex numbers per register (re, im interleaved), as the scalar loops compute
// it: (br wr - bi wi, bi wr + br wi), the same products and sums, so the same doubles.
FEDSHIELD_AVX2 inline __m256d complex_mul(__m256d b, __m256d w) {
    const __m256d wr = _mm256_movedup_pd(w), wi = _mm256_permute_pd(w, 0xF);
    return _mm256_addsub_pd(_mm256_mul_pd(b, wr), _mm256_mul_pd(_mm256_permute_pd(b, 0x5), wi));
}

// fft_special and fft_special_inv with AVX2, the same butterflies in the same order on each
// element, so the same doubles; only the memory schedule differs. Two complex values per
// register. The bit reversal and the two smallest levels (len 2 and 4) are one in-place pass
// over groups of positions that the reversal maps onto each other; the other levels go two or
// three at a time (radix 4 or 8 in registers), a third or half of the passes over memory.
FEDSHIELD_AVX2 inline void fwd_bfly(__m256d& a, __m256d& b, __m256d w) {
    const __m256d x = complex_mul(b, w);
    b = _mm256_sub_pd(a, x);
    a = _mm256_add_pd(a, x);
}
FEDSHIELD_AVX2 inline void inv_bfly(__m256d& a, __m256d& b, __m256d w) {
    const __m256d d = _mm256_sub_pd(a, b);
    a = _mm256_add_pd(a, b);
    b = complex_mul(d, w);
}
FEDSHIELD_AVX2 inline __m256d twice(const double* w) {  // one complex twiddle in both lanes
    return _mm256_broadcast_pd(reinterpret_cast<const __m128d*>(w));
}

// Positions p = (hi, mid, lo) = hi * slots/4 + 4 mid + lo (hi, lo < 4) reverse to
// (rev2(lo), rev(mid), rev2(hi)). The blocks of four outputs (hi, mid, .) for one mid read the
// inputs (., rev(mid), .): mid and rev(mid) together are closed under the reversal. Blocks
// hi = 0 and 2 (or 1 and 3) read adjacent inputs, rev2(hi) = 0 and 1 (2 and 3): one load
// serves both, lane 0 and lane 1.
struct RevGroup {
    size_t quarter;  // slots / 4, in complex values
    // the four inputs of the blocks hi = h, h + 2 (h = 0, 1): x[i] for output i of the block
    FEDSHIELD_AVX2 void load(const double* v, size_t rmid, size_t h, __m256d x[4]) const {
        const double* base = v + 2 * (4 * rmid + 2 * h);
        x[0] = _mm256_loadu_pd(base);                    // lo = 0: rev2 0
        x[2] = _mm256_loadu_pd(base + 2 * quarter);      // lo = 1: output 2
        x[1] = _mm256_loadu_pd(base + 4 * quarter);      // lo = 2: output 1
        x[3] = _mm256_loadu_pd(base + 6 * quarter);
    }
    FEDSHIELD_AVX2 void store(double* v, size_t rmid, size_t h, const __m256d x[4]) const {
        double* base = v + 2 * (4 * rmid + 2 * h);
        _mm256_storeu_pd(base, x[0]);
        _mm256_storeu_pd(base + 2 * quarter, x[2]);
        _mm256_storeu_pd(base + 4 * quarter, x[1]);
        _mm256_storeu_pd(base + 6 * quarter, x[3]);
    }
    // the outputs of blocks (h, mid) and (h + 2, mid), contiguous four each, as lanes
    FEDSHIELD_AVX2 void gather(const double* v, size_t mid, size_t h, __m256d y[4]) const {
        const double* a = v + 2 * (h * quarter + 4 * mid);
        const double* b = a + 4 * quarter;
        const __m256d a01 = _mm256_loadu_pd(a), a23 = _mm256_loadu_pd(a + 4);
        const __m256d b01 = _mm256_loadu_pd(b), b23 = _mm256_loadu_pd(b + 4);
        y[0] = _mm256_permute2f128_pd(a01, b01, 0x20);
        y[1] = _mm256_permute2f128_pd(a01, b01, 0x31);
        y[2] = _mm256_permute2f128_pd(a23, b23, 0x20);
        y[3] = _mm256_permute2f128_pd(a23, b23, 0x31);
    }
    FEDSHIELD_AVX2 void scatter(double* v, size_t mid, size_t h, const __m256d y[4]) const {
        double* a = v + 2 * (h * quarter + 4 * mid);
        double* b = a + 4 * quarter;
        _mm256_storeu_pd(a, _mm256_permute2f128_pd(y[0], y[1], 0x20));
        _mm256_storeu_pd(a + 4, _mm256_permute2f128_pd(y[2], y[3], 0x20));
        _mm256_storeu_pd(b, _mm256_permute2f128_pd(y[0], y[1], 0x31));
        _mm256_storeu_pd(b + 4, _mm256_permute2f128_pd(y[2], y[3], 0x31));
    }
};

// Levels len = 2 and 4 of four values (two blocks as lanes), forward; and inverse, with the
// 1/slots scaling.
FEDSHIELD_AVX2 inline void fwd_first_levels(__m256d x[4], __m256d w2, __m256d w4a,
                                            __m256d w4b) {
    fwd_bfly(x[0], x[1], w2);
    fwd_bfly(x[2], x[3], w2);
    fwd_bfly(x[0], x[2], w4a);
    fwd_bfly(x[1], x[3], w4b);
}
FEDSHIELD_AVX2 inline void inv_last_levels(__m256d y[4], __m256d w2, __m256d w4a, __m256d w4b,
                                           __m256d scale) {
    inv_bfly(y[0], y[2], w4a);
    inv_bfly(y[1], y[3], w4b);
    inv_bfly(y[0], y[1], w2);
    inv_bfly(y[2], y[3], w2);
    for (int i = 0; i < 4; ++i) y[i] = _mm256_mul_pd(y[i], scale);
}

// Forward: bit reversal, then levels len = 2 and 4, for the blocks of mid and rev(mid).
FEDSHIELD_AVX2 void fft_reverse_first_levels(double* v, const FftTables& t) {
    const RevGroup g{t.slots / 4};
    const __m256d w2 = twice(t.fwd.data()), w4a = twice(t.fwd.data() + 2),
                  w4b = twice(t.fwd.data() + 4);
    for (size_t mid = 0; mid < t.slots / 16; ++mid) {
        const size_t rmid = t.rev[4 * mid] / 4;
        if (rmid < mid) continue;
        // every input of the group is loaded before any output is stored
        const size_t at[2] = {mid, rmid}, k = rmid == mid ? 1 : 2;
        __m256d x[2][2][4];  // [blocks of mid, of rev(mid)][h][output]
        for (size_t s = 0; s < k; ++s)
            for (size_t h = 0; h < 2; ++h) g.load(v, at[1 - s], h, x[s][h]);
        for (size_t s = 0; s < k; ++s)
            for (size_t h = 0; h < 2; ++h) {
                fwd_first_levels(x[s][h], w2, w4a, w4b);
                g.scatter(v, at[s], h, x[s][h]);
            }
    }
}

// Inverse: levels len = 4 and 2, the 1/slots scaling, then bit reversal.
FEDSHIELD_AVX2 void fft_last_levels_reverse(double* v, const FftTables& t) {
    const RevGroup g{t.slots / 4};
    const __m256d w2 = twice(t.inv.data()), w4a = twice(t.inv.data() + 2),
                  w4b = twice(t.inv.data() + 4);
    const __m256d scale = _mm256_set1_pd(1.0 / static_cast<double>(t.slots));
    for (size_t mid = 0; mid < t.slots / 16; ++mid) {
        const size_t rmid = t.rev[4 * mid] / 4;
        if (rmid < mid) continue;
        const size_t at[2] = {mid, rmid}, k = rmid == mid ? 1 : 2;
        __m256d y[2][2][4];
        for (size_t s = 0; s < k; ++s)
            for (size_t h = 0; h < 2; ++h) g.gather(v, at[s], h, y[s][h]);
        for (size_t s = 0; s < k; ++s)
            for (size_t h = 0; h < 2; ++h) {
                inv_last_levels(y[s][h], w2, w4a, w4b, scale);
                g.store(v, at[1 - s], h, y[s][h]);
            }
    }
}

// Forward levels len, 2 len (and 4 len when `three`) in one pass; half = len / 2 >= 2.
template <bool three>
FEDSHIELD_AVX2 void fft_fwd_pass(double* v, const FftTables& t, size_t len) {
    const size_t h = len >> 1, span = (three ? 8 : 4) * h;
    const double* t1 = t.fwd.data() + 2 * (h - 1);
    const double* t2 = t.fwd.data() + 2 * (2 * h - 1);
    const double* t3 = t.fwd.data() + 2 * (4 * h - 1);
    for (size_t i = 0; i < t.slots; i += span) {
        double* p = v + 2 * i;
        for (size_t j = 0; j < h; j += 2) {
            constexpr int k = three ? 8 : 4;
            __m256d x[k];
            for (int r = 0; r < k; ++r) x[r] = _mm256_loadu_pd(p + 2 * (j + r * h));
            const __m256d w1 = _mm256_loadu_pd(t1 + 2 * j);
            for (int r = 0; r < k; r += 2) fwd_bfly(x[r], x[r + 1], w1);
            const __m256d w2a = _mm256_loadu_pd(t2 + 2 * j), w2b = _mm256_loadu_pd(t2 + 2 * (j + h));
            for (int r = 0; r < k; r += 4) {
                fwd_bfly(x[r], x[r + 2], w2a);
                fwd_bfly(x[r + 1], x[r + 3], w2b);
            }
            if constexpr (three)
                for (int r = 0; r < 4; ++r)
                    fwd_bfly(x[r], x[r + 4], _mm256_loadu_pd(t3 + 2 * (j + r * h)));
            for (int r = 0; r < k; ++r) _mm256_storeu_pd(p + 2 * (j + r * h), x[r]);
        }
    }
}

// Inverse levels 4 len (when `three`), 2 len, len in one pass; half = len / 2 >= 2.
template <bool three>
FEDSHIELD_AVX2 void fft_inv_pass(double* v, const FftTables& t, size_t len) {
    const size_t h = len >> 1, span = (three ? 8 : 4) * h;
    const double* t1 = t.inv.data() + 2 * (h - 1);
    const double* t2 = t.inv.data() + 2 * (2 * h - 1);
    const double* t3 = t.inv.data() + 2 * (4 * h - 1);
    for (size_t i = 0; i < t.slots; i += span) {
        double* p = v + 2 * i;
        for (size_t j = 0; j < h; j += 2) {
            constexpr int k = three ? 8 : 4;
            __m256d x[k];
            for (int r = 0; r < k; ++r) x[r] = _mm256_loadu_pd(p + 2 * (j + r * h));
            if constexpr (three)
                for (int r = 0; r < 4; ++r)
                    inv_bfly(x[r], x[r + 4], _mm256_loadu_pd(t3 + 2 * (j + r * h)));
            const __m256d w2a = _mm256_loadu_pd(t2 + 2 * j), w2b = _mm256_loadu_pd(t2 + 2 * (j + h));
            for (int r = 0; r < k; r += 4) {
                inv_bfly(x[r], x[r + 2], w2a);
                inv_bfly(x[r + 1], x[r + 3], w2b);
            }
            const __m256d w1 = _mm256_loadu_pd(t1 + 2 * j);
            for (int r = 0; r < k; r += 2) inv_bfly(x[r], x[r + 1], w1);
            for (int r = 0; r < k; ++r) _mm256_storeu_pd(p + 2 * (j + r * h), x[r]);
        }
    }
}

// One level (radix 2), half = len / 2 >= 2.
FEDSHIELD_AVX2 void fft_fwd_level(double* v, const FftTables& t, size_t len) {
    const size_t half = len >> 1;
    const double* tw = t.fwd.data() + 2 * (half - 1);
    for (size_t i = 0; i < t.slots; i += len) {
        for (size_t j = 0; j < half; j += 2) {
            double* a = v + 2 * (i + j);
            double* b = v + 2 * (i + j + half);
            __m256d x = _mm256_loadu_pd(a), y = _mm256_loadu_pd(b);
            fwd_bfly(x, y, _mm256_loadu_pd(tw + 2 * j));
            _mm256_storeu_pd(a, x);
            _mm256_storeu_pd(b, y);
        }
    }
}
FEDSHIELD_AVX2 void fft_inv_level(double* v, const FftTables& t, size_t len) {
    const size_t half = len >> 1;
    const double* tw = t.inv.data() + 2 * (half - 1);
    for (size_t i = 0; i < t.slots; i += len) {
        for (size_t j = 0; j < half; j += 2) {
            double* a = v + 2 * (i + j);
            double* b = v + 2 * (i + j + half);
            __m256d x = _mm256_loadu_pd(a), y = _mm256_loadu_pd(b);
            inv_bfly(x, y, _mm256_loadu_pd(tw + 2 * j));
            _mm256_storeu_pd(a, x);
            _mm256_storeu_pd(b, y);
        }
    }
}

// slots >= 16 (the reversal groups need two bits at each end and the passes half >= 2). After
// the reversal pass: radix 8 for levels len = 8, 16, 32 (a span of 64 values, 1 KB), then one
// radix-2 level if the count left is odd, then radix 4. Radix 8 higher up reads eight values
// 4 KB or more apart, one L1 set, with its twiddles: on a Zen 3 it took 1.5-2x longer at
// N = 8192 and 16384 than this plan, which was within 3% of the best of those tried at
// N = 4096, 8192 and 16384.
unsigned fft_levels_above_4(const FftTables& t) {
    unsigned levels = 0;
    while ((size_t{8} << levels) <= t.slots) ++levels;
    return levels;
}

FEDSHIELD_AVX2 void fft_special_avx2(double* v, const FftTables& t) {
    fft_reverse_first_levels(v, t);
    unsigned left = fft_levels_above_4(t);
    size_t len = 8;
    if (left >= 3) {
        fft_fwd_pass<true>(v, t, len);
        len <<= 3;
        left -= 3;
    }
    if (left % 2) {
        fft_fwd_level(v, t, len);
        len <<= 1;
        --left;
    }
    for (; left > 0; left -= 2, len <<= 2) fft_fwd_pass<false>(v, t, len);
}

// The same passes as fft_special_avx2, from the top.
FEDSHIELD_AVX2 void fft_special_inv_avx2(double* v, const FftTables& t) {
    const unsigned levels = fft_levels_above_4(t);
    const unsigned radix8 = levels >= 3 ? 3 : 0;
    size_t len = t.slots;  // the highest level still to do
    for (unsigned k = 0; k < (levels - radix8) / 2; ++k, len >>= 2)
        fft_inv_pass<false>(v, t, len / 2);
    if ((levels - radix8) % 2) {
        fft_inv_level(v, t, len);
        len >>= 1;
    }
    if (radix8) fft_inv_pass<true>(v, t, len / 4);
    fft_last_levels_reverse(v, t);
}
#endif

// The special FFT and its inverse with AVX2 where the CPU has it.
void slots_from_coefficients(double* v, const FftTables& t) {
#if defined(__x86_64__) && defined(__GNUC__)
    if (have_avx2() && t.slots >= 16) return fft_special_avx2(v, t);
#endif
    fft_special(v, t);
}
void coefficients_from_slots(double* v, const FftTables& t) {
#if defined(__x86_64__) && defined(__GNUC__)
    if (have_avx2() && t.slots >= 16) return fft_special_inv_avx2(v, t);
#endif
    fft_special_inv(v, t);
}

// --- per-ring constants ----------------------------------------------------------------------

constexpr int kPow2 = 1100;  // above any double's binary exponent

// One tower's negacyclic NTT in OpenFHE's order (the same transform as flood.hpp's
// ntt_forward/ntt_inverse, tested equal), with lazy reduction (Harvey 2014): values stay in
// [0, 4q) between butterflies, q < 2^62.
struct NttPlan {
    uint64_t q = 0;
    std::vector<uint64_t> w, w_shoup, iw, iw_shoup;  // psi^bitrev(k), (psi^-1)^bitrev(k)
    uint64_t n_inv = 0, n_inv_shoup = 0;
    uint64_t last_inv = 0, last_inv_shoup = 0;  // (psi^-1)^bitrev(1) * N^-1
    // q < 2^60 on a CPU with AVX2: the 64-bit four-lane NTT below (avx_ntt_fwd), on the
    // twiddles above
    bool avx = false;
};

bool avx_ntt_available();
constexpr uint64_t kAvxLimit = uint64_t{1} << 60;

NttPlan make_plan(uint64_t n, uint64_t q, uint64_t psi) {
    NttPlan p;
    p.q = q;
    unsigned logn = 0;
    while ((uint64_t{1} << logn) < n) ++logn;
    const uint64_t psi_inv = powmod(psi, 2 * n - 1, q);
    std::vector<uint64_t> pw(n), ipw(n);
    pw[0] = ipw[0] = 1;
    for (uint64_t k = 1; k < n; ++k) {
        pw[k] = static_cast<uint64_t>(static_cast<u128>(pw[k - 1]) * psi % q);
        ipw[k] = static_cast<uint64_t>(static_cast<u128>(ipw[k - 1]) * psi_inv % q);
    }
    p.w.resize(n);
    p.w_shoup.resize(n);
    p.iw.resize(n);
    p.iw_shoup.resize(n);
    for (uint64_t k = 0; k < n; ++k) {
        uint64_t r = 0;
        for (unsigned b = 0; b < logn; ++b) r |= ((k >> b) & 1) << (logn - 1 - b);
        p.w[k] = pw[r];
        p.w_shoup[k] = shoup_of(pw[r], q);
        p.iw[k] = ipw[r];
        p.iw_shoup[k] = shoup_of(ipw[r], q);
    }
    p.n_inv = powmod(n % q, q - 2, q);
    p.n_inv_shoup = shoup_of(p.n_inv, q);
    p.last_inv = static_cast<uint64_t>(static_cast<u128>(p.iw[1]) * p.n_inv % q);
    p.last_inv_shoup = shoup_of(p.last_inv, q);
    p.avx = q < kAvxLimit && n >= 16 && avx_ntt_available();
    return p;
}

// a * w mod q in [0, 2q), for any a < 2^64.
inline uint64_t mul_shoup_lazy(uint64_t a, uint64_t w, uint64_t w_shoup, uint64_t q) {
    const uint64_t hi = static_cast<uint64_t>((static_cast<u128>(a) * w_shoup) >> 64);
    return a * w - hi * q;
}

// One Cooley-Tukey level of half-length t >= 2 (values in [0, 4q)).
inline void fwd_level(uint64_t* a, uint64_t m, uint64_t t, const NttPlan& p) {
    const uint64_t q = p.q, two_q = 2 * q;
    for (uint64_t i = 0; i < m; ++i) {
        const uint64_t w = p.w[m + i], ws = p.w_shoup[m + i];
        uint64_t* x = a + 2 * i * t;
        uint64_t* y = x + t;
        for (uint64_t j = 0; j < t; ++j) {
            const uint64_t u = csub(x[j], two_q);
            const uint64_t v = mul_shoup_lazy(y[j], w, ws, q);
            x[j] = u + v;
            y[j] = u - v + two_q;
        }
    }
}

// coefficients (below q) -> evaluations (below q), Cooley-Tukey, bit-reversed output. The
// last level (one butterfly per twiddle) is its own loop and reduces its outputs below q, so
// no separate pass over the array does.
void ntt_fwd(uint64_t* a, uint64_t n, const NttPlan& p) {
    const uint64_t q = p.q, two_q = 2 * q;
    uint64_t m = 1, t = n >> 1;
    for (; t > 2; m <<= 1, t >>= 1) fwd_level(a, m, t, p);
    fwd_level(a, m, 2, p);  // t = 2: a constant trip count the compiler unrolls
    m <<= 1;
    for (uint64_t i = 0; i < m; ++i) {
        const uint64_t u = csub(a[2 * i], two_q);
        const uint64_t v = mul_shoup_lazy(a[2 * i + 1], p.w[m + i], p.w_shoup[m + i], q);
        a[2 * i] = csub(csub(u + v, two_q), q);
        a[2 * i + 1] = csub(csub(u - v + two_q, two_q), q);
    }
}

// evaluations (below q) -> coefficients (below q), Gentleman-Sande; values in [0, 2q) between
// levels. The first level (one butterfly per twiddle) is its own loop, and the last one
// multiplies by N^-1 on the way (its twiddle premultiplied by N^-1): no separate pass.
void ntt_inv(uint64_t* a, uint64_t n, const NttPlan& p) {
    const uint64_t q = p.q, two_q = 2 * q;
    {
        const uint64_t h = n >> 1;
        for (uint64_t i = 0; i < h; ++i) {
            const uint64_t u = a[2 * i], v = a[2 * i + 1];
            a[2 * i] = csub(u + v, two_q);
            a[2 * i + 1] = mul_shoup_lazy(u - v + two_q, p.iw[h + i], p.iw_shoup[h + i], q);
        }
    }
    for (uint64_t m = n >> 1, t = 2; m > 2; m >>= 1, t <<= 1) {
        const uint64_t h = m >> 1;
        for (uint64_t i = 0; i < h; ++i) {
            const uint64_t w = p.iw[h + i], ws = p.iw_shoup[h + i];
            uint64_t* x = a + 2 * i * t;
            uint64_t* y = x + t;
            for (uint64_t j = 0; j < t; ++j) {
                const uint64_t u = x[j], v = y[j];
                x[j] = csub(u + v, two_q);
                y[j] = mul_shoup_lazy(u - v + two_q, w, ws, q);
            }
        }
    }
    const uint64_t half = n >> 1;
    uint64_t* y = a + half;
    for (uint64_t j = 0; j < half; ++j) {
        const uint64_t u = a[j], v = y[j];
        a[j] = csub(mul_shoup_lazy(u + v, p.n_inv, p.n_inv_shoup, q), q);
        y[j] = csub(mul_shoup_lazy(u - v + two_q, p.last_inv, p.last_inv_shoup, q), q);
    }
}

// --- the same NTT in 64-bit lanes with AVX2, for moduli below 2^60 ------------------------------
//
// Four residues per register (threshold keys' 60-bit tower, shared keys' 42-bit one; at 42 bits
// it also beat a double-precision NTT, 15-20% per call on Zen 3). AVX2 multiplies 32 x 32 -> 64 bits (_mm256_mul_epu32 reads each lane's low
// half), so a * w mod q (a < 8q, a fixed w < q, w' = floor(w * 2^64 / q)) is Shoup's product
// with an approximate quotient. Writing a = a1 2^32 + a0 and w' = w1' 2^32 + w0',
//   Q = floor(a w' / 2^64) = floor(a1 w1' + a1 w0' / 2^32 + a0 w1' / 2^32 + a0 w0' / 2^64),
// and the quotient used, Q^ = a1 w1' + floor(a1 w0' / 2^32) + floor(a0 w1' / 2^32), drops three
// fractions each below 1 (and one product): Q - 2 <= Q^ <= Q. Shoup's bound gives
// 0 <= a w - Q q < q (1 + a / 2^64) < 1.5 q (a < 8q < 2^63), so r = a w - Q^ q is in
// [0, 3.5q): below 2^64, hence equal to the low 64 bits of a w - Q^ q, which take low products
// only. Since r < 4q needs no further reduction, the butterflies keep their values in [0, 8q)
// (Harvey's lazy butterflies with twice the scalar path's bounds):
//   forward: x, y < 8q; u = x - 4q if x >= 4q (u < 4q); v = y w mod q < 4q;
//            x' = u + v < 8q, y' = u - v + 4q in (0, 8q);
//   inverse: x, y < 4q; x' = (x + y) - 4q if x + y >= 4q (x' < 4q); y' = (x - y + 4q) w < 4q.
// The last level reduces below q with conditional subtractions of 4q, 2q, q. q < 2^60 keeps
// every value and difference below 2^63 in magnitude, so a conditional subtraction is a
// subtraction and a blend on its sign bit: masks, no branch and no look-up by value. Values
// between levels may differ from the scalar path's by multiples of q; the outputs, reduced
// below q as there, are the same residues (tested bit for bit).

bool avx_ntt_available() {
#if defined(__x86_64__) && defined(__GNUC__)
    return have_avx2();
#else
    return false;
#endif
}

#if defined(__x86_64__) && defined(__GNUC__)

// x - m where x >= m, else x (x, m < 2^63): the sign bit of x - m picks.
FEDSHIELD_AVX2 inline __m256i avx_csub(__m256i x, __m256i m) {
    const __m256d d = _mm256_castsi256_pd(_mm256_sub_epi64(x, m));
    return _mm256_castpd_si256(_mm256_blendv_pd(d, _mm256_castsi256_pd(x), d));
}

// A twiddle per lane: w, w with its 32-bit halves swapped, w' and w' >> 32.
struct AvxTwiddle {
    __m256i w, w_swap, ws, ws_hi;
};
FEDSHIELD_AVX2 inline AvxTwiddle avx_twiddle(__m256i w, __m256i ws) {
    return {w, _mm256_shuffle_epi32(w, 0xB1), ws, _mm256_srli_epi64(ws, 32)};
}

// The modulus per lane: q, q with its halves swapped, 2q, 4q, and the mask of each high half.
struct AvxModulus {
    __m256i q, q_swap, two_q, four_q, high;
};
FEDSHIELD_AVX2 inline AvxModulus avx_modulus(uint64_t q) {
    const __m256i v = _mm256_set1_epi64x(static_cast<long long>(q));
    return {v, _mm256_shuffle_epi32(v, 0xB1), _mm256_add_epi64(v, v),
            _mm256_set1_epi64x(static_cast<long long>(4 * q)),
            _mm256_set1_epi64x(static_cast<long long>(0xFFFFFFFF00000000ULL))};
}

// a * w mod q in [0, 3.5q) for a < 8q (see above). The low 64 bits of a w - Q^ q are the low
// halves' full products (_mm256_mul_epu32) plus 2^32 times the cross products, which count
// only mod 2^32: _mm256_mullo_epi32 of a by w_swap gives a0 w1 and a1 w0 in one lane's two
// halves, and the high half of x + (x << 32) sums them.
FEDSHIELD_AVX2 inline __m256i avx_mul_shoup(__m256i a, const AvxTwiddle& w, const AvxModulus& m) {
    const __m256i a_hi = _mm256_srli_epi64(a, 32);
    __m256i quot = _mm256_mul_epu32(a_hi, w.ws_hi);
    quot = _mm256_add_epi64(quot, _mm256_srli_epi64(_mm256_mul_epu32(a_hi, w.ws), 32));
    quot = _mm256_add_epi64(quot, _mm256_srli_epi64(_mm256_mul_epu32(a, w.ws_hi), 32));
    const __m256i low = _mm256_sub_epi64(_mm256_mul_epu32(a, w.w), _mm256_mul_epu32(quot, m.q));
    const __m256i cross = _mm256_sub_epi32(_mm256_mullo_epi32(a, w.w_swap),
                                           _mm256_mullo_epi32(quot, m.q_swap));
    const __m256i high = _mm256_and_si256(_mm256_add_epi64(cross, _mm256_slli_epi64(cross, 32)),
                                          m.high);
    return _mm256_add_epi64(low, high);
}

FEDSHIELD_AVX2 inline __m256i avx_load(const uint64_t* p) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
}
FEDSHIELD_AVX2 inline void avx_store(uint64_t* p, __m256i v) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v);
}
FEDSHIELD_AVX2 inline __m256i avx_set1(uint64_t v) {
    return _mm256_set1_epi64x(static_cast<long long>(v));
}
// Twiddles k, k, k + 1, k + 1 (a t = 2 level's lanes)
FEDSHIELD_AVX2 inline __m256i avx_pairs(const uint64_t* p) {
    const __m128i two = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_permute4x64_epi64(_mm256_castsi128_si256(two), 0x50);
}
// Twiddles k, k + 2, k + 1, k + 3 (a t = 1 level's lanes after the unpack)
FEDSHIELD_AVX2 inline __m256i avx_unpacked(const uint64_t* p) {
    return _mm256_permute4x64_epi64(avx_load(p), 0xD8);
}

// coefficients -> evaluations (ntt_fwd's result), q < 2^60, n >= 16. Twiddles of the t = 2 and
// t = 1 levels are permuted into the lanes of their butterflies.
FEDSHIELD_AVX2 void avx_ntt_fwd(uint64_t* a, uint64_t n, const NttPlan& p) {
    const AvxModulus mod = avx_modulus(p.q);
    const __m256i q = mod.q, two_q = mod.two_q, four_q = mod.four_q;
    const uint64_t* tw = p.w.data();
    const uint64_t* tws = p.w_shoup.data();
    uint64_t m = 1, t = n >> 1;
    for (; t >= 4; m <<= 1, t >>= 1) {
        for (uint64_t i = 0; i < m; ++i) {
            const AvxTwiddle w = avx_twiddle(avx_set1(*(tw + m + i)), avx_set1(*(tws + m + i)));
            uint64_t* x = a + 2 * i * t;
            uint64_t* y = x + t;
            for (uint64_t j = 0; j < t; j += 4) {
                const __m256i u = avx_csub(avx_load(x + j), four_q);
                const __m256i v = avx_mul_shoup(avx_load(y + j), w, mod);
                avx_store(x + j, _mm256_add_epi64(u, v));
                avx_store(y + j, _mm256_add_epi64(_mm256_sub_epi64(u, v), four_q));
            }
        }
    }
    // t = 2: groups [x0 x1 y0 y1] of one twiddle, two groups per step
    for (uint64_t i = 0; i < m; i += 2) {
        uint64_t* g = a + 4 * i;
        const __m256i v0 = avx_load(g), v1 = avx_load(g + 4);
        const __m256i x = _mm256_permute2x128_si256(v0, v1, 0x20);
        const __m256i y = _mm256_permute2x128_si256(v0, v1, 0x31);
        const AvxTwiddle w = avx_twiddle(avx_pairs(tw + m + i), avx_pairs(tws + m + i));
        const __m256i u = avx_csub(x, four_q), v = avx_mul_shoup(y, w, mod);
        const __m256i s = _mm256_add_epi64(u, v);
        const __m256i d = _mm256_add_epi64(_mm256_sub_epi64(u, v), four_q);
        avx_store(g, _mm256_permute2x128_si256(s, d, 0x20));
        avx_store(g + 4, _mm256_permute2x128_si256(s, d, 0x31));
    }
    m <<= 1;
    // t = 1: pairs [x y], four per step; outputs reduced below q
    for (uint64_t i = 0; i < m; i += 4) {
        uint64_t* g = a + 2 * i;
        const __m256i v0 = avx_load(g), v1 = avx_load(g + 4);
        const __m256i x = _mm256_unpacklo_epi64(v0, v1), y = _mm256_unpackhi_epi64(v0, v1);
        const AvxTwiddle w = avx_twiddle(avx_unpacked(tw + m + i), avx_unpacked(tws + m + i));
        const __m256i u = avx_csub(x, four_q), v = avx_mul_shoup(y, w, mod);
        const __m256i s = avx_csub(avx_csub(avx_csub(_mm256_add_epi64(u, v), four_q), two_q), q);
        const __m256i d = avx_csub(
            avx_csub(avx_csub(_mm256_add_epi64(_mm256_sub_epi64(u, v), four_q), four_q), two_q),
            q);
        avx_store(g, _mm256_unpacklo_epi64(s, d));
        avx_store(g + 4, _mm256_unpackhi_epi64(s, d));
    }
}

// evaluations -> coefficients (ntt_inv's result), q < 2^60, n >= 16; values in [0, 4q) between
// levels, the last level multiplies by N^-1 (as ntt_inv).
FEDSHIELD_AVX2 void avx_ntt_inv(uint64_t* a, uint64_t n, const NttPlan& p) {
    const AvxModulus mod = avx_modulus(p.q);
    const __m256i q = mod.q, two_q = mod.two_q, four_q = mod.four_q;
    const uint64_t* tw = p.iw.data();
    const uint64_t* tws = p.iw_shoup.data();
    // t = 1 (h = n / 2 twiddles): inputs below q, so x + y < 2q needs no reduction
    for (uint64_t h = n >> 1, i = 0; i < h; i += 4) {
        uint64_t* g = a + 2 * i;
        const __m256i v0 = avx_load(g), v1 = avx_load(g + 4);
        const __m256i x = _mm256_unpacklo_epi64(v0, v1), y = _mm256_unpackhi_epi64(v0, v1);
        const AvxTwiddle w = avx_twiddle(avx_unpacked(tw + h + i), avx_unpacked(tws + h + i));
        const __m256i s = _mm256_add_epi64(x, y);
        const __m256i d = avx_mul_shoup(_mm256_add_epi64(_mm256_sub_epi64(x, y), q), w, mod);
        avx_store(g, _mm256_unpacklo_epi64(s, d));
        avx_store(g + 4, _mm256_unpackhi_epi64(s, d));
    }
    // t = 2 (h = n / 4 twiddles)
    for (uint64_t h = n >> 2, i = 0; i < h; i += 2) {
        uint64_t* g = a + 4 * i;
        const __m256i v0 = avx_load(g), v1 = avx_load(g + 4);
        const __m256i x = _mm256_permute2x128_si256(v0, v1, 0x20);
        const __m256i y = _mm256_permute2x128_si256(v0, v1, 0x31);
        const AvxTwiddle w = avx_twiddle(avx_pairs(tw + h + i), avx_pairs(tws + h + i));
        const __m256i s = avx_csub(_mm256_add_epi64(x, y), four_q);
        const __m256i d = avx_mul_shoup(_mm256_add_epi64(_mm256_sub_epi64(x, y), four_q), w, mod);
        avx_store(g, _mm256_permute2x128_si256(s, d, 0x20));
        avx_store(g + 4, _mm256_permute2x128_si256(s, d, 0x31));
    }
    for (uint64_t m = n >> 2, t = 4; m > 2; m >>= 1, t <<= 1) {
        const uint64_t h = m >> 1;
        for (uint64_t i = 0; i < h; ++i) {
            const AvxTwiddle w = avx_twiddle(avx_set1(*(tw + h + i)), avx_set1(*(tws + h + i)));
            uint64_t* x = a + 2 * i * t;
            uint64_t* y = x + t;
            for (uint64_t j = 0; j < t; j += 4) {
                const __m256i u = avx_load(x + j), v = avx_load(y + j);
                avx_store(x + j, avx_csub(_mm256_add_epi64(u, v), four_q));
                avx_store(y + j,
                          avx_mul_shoup(_mm256_add_epi64(_mm256_sub_epi64(u, v), four_q), w, mod));
            }
        }
    }
    // the last level, N^-1 folded in
    const AvxTwiddle ni = avx_twiddle(avx_set1(p.n_inv), avx_set1(p.n_inv_shoup));
    const AvxTwiddle li = avx_twiddle(avx_set1(p.last_inv), avx_set1(p.last_inv_shoup));
    const uint64_t half = n >> 1;
    uint64_t* y = a + half;
    for (uint64_t j = 0; j < half; j += 4) {
        const __m256i u = avx_load(a + j), v = avx_load(y + j);
        const __m256i s = avx_mul_shoup(_mm256_add_epi64(u, v), ni, mod);
        const __m256i d = avx_mul_shoup(_mm256_add_epi64(_mm256_sub_epi64(u, v), four_q), li, mod);
        avx_store(a + j, avx_csub(avx_csub(s, two_q), q));
        avx_store(y + j, avx_csub(avx_csub(d, two_q), q));
    }
}
#endif

// The forward and inverse NTT of the plan's tower: in four 64-bit lanes where the CPU has AVX2
// and q < 2^60, else in scalar 64-bit words.
void ntt_forward_any(uint64_t* a, uint64_t n, const NttPlan& p) {
#if defined(__x86_64__) && defined(__GNUC__)
    if (p.avx) return avx_ntt_fwd(a, n, p);
#endif
    ntt_fwd(a, n, p);
}
void ntt_inverse_any(uint64_t* a, uint64_t n, const NttPlan& p) {
#if defined(__x86_64__) && defined(__GNUC__)
    if (p.avx) return avx_ntt_inv(a, n, p);
#endif
    ntt_inv(a, n, p);
}

struct RingTables {
    std::vector<NttPlan> ntt;              // one per tower
    std::vector<uint64_t> mu;              // floor(2^64 / q_i)
    std::vector<std::vector<uint64_t>> pow2;  // 2^k mod q_i, k < kPow2 (large coefficients)
    // CRT (T > 1): y_i = x_i * qhat_inv_i mod q_i, x = Q * frac(sum y_i / q_i)
    std::vector<uint64_t> qhat_inv, qhat_inv_shoup;
    long double big_q = 1;
    std::shared_ptr<const FftTables> fft;
};

std::shared_ptr<const RingTables> ring_tables(const CkksRing& ring) {
    static std::mutex lock;
    static std::map<std::vector<uint64_t>, std::shared_ptr<const RingTables>> cache;
    std::vector<uint64_t> key(ring.moduli);
    key.insert(key.end(), ring.roots.begin(), ring.roots.end());
    key.push_back(ring.ring_dim);
    std::lock_guard<std::mutex> guard(lock);
    auto it = cache.find(key);
    if (it != cache.end()) return it->second;
    auto t = std::make_shared<RingTables>();
    const size_t towers = ring.towers();
    for (size_t i = 0; i < towers; ++i) {
        const uint64_t q = ring.moduli[i];
        t->mu.push_back(static_cast<uint64_t>((u128{1} << 64) / q));
        t->ntt.push_back(make_plan(ring.ring_dim, q, ring.roots[i]));
        uint64_t qhat = 1;
        for (size_t j = 0; j < towers; ++j)
            if (j != i) qhat = static_cast<uint64_t>(static_cast<u128>(qhat) * (ring.moduli[j] % q) % q);
        const uint64_t inv = powmod(qhat, q - 2, q);  // q prime
        t->qhat_inv.push_back(inv);
        t->qhat_inv_shoup.push_back(shoup_of(inv, q));
        t->big_q *= static_cast<long double>(q);
        std::vector<uint64_t> p(kPow2);
        p[0] = 1 % q;
        for (int k = 1; k < kPow2; ++k) p[k] = add_q(p[k - 1], p[k - 1], q);
        t->pow2.push_back(std::move(p));
    }
    t->fft = fft_tables(ring.ring_dim);
    if (cache.size() > 64) cache.clear();
    cache.emplace(key, t);
    return t;
}

// --- randomness --------------------------------------------------------------------------------

// Cumulative table of |x| for the discrete Gaussian exp(-x^2 / (2 sigma^2)), sigma = 3.19:
// cdt[k] = 2^63 * P(|x| <= k). |x| > kTail has probability below 2^-110 and is not drawn.
constexpr int kTail = 40;

const std::vector<uint64_t>& error_cdt() {
    static const std::vector<uint64_t> table = [] {
        const long double s2 = static_cast<long double>(kErrorSigma) * kErrorSigma;
        std::vector<long double> rho(kTail + 1);
        long double total = 0;
        for (int k = 0; k <= kTail; ++k) {
            rho[k] = std::exp(-static_cast<long double>(k) * k / (2 * s2));
            total += k == 0 ? rho[k] : 2 * rho[k];
        }
        std::vector<uint64_t> cdt(kTail);
        long double acc = 0;
        for (int k = 0; k < kTail; ++k) {
            acc += (k == 0 ? rho[k] : 2 * rho[k]) / total;
            cdt[k] = static_cast<uint64_t>(std::ldexp(acc, 63));
        }
        return cdt;
    }();
    return table;
}

// Error samples from uniform words: |x| = the number of thresholds a 63-bit word reaches
// (every entry compared for every sample: no early exit, no look-up indexed by a sample), then
// the word's low bit as the sign. Signed compares (both sides < 2^63) vectorise with AVX2.
FEDSHIELD_SIMD_CLONES
void error_block(const uint64_t* __restrict__ words, int64_t* __restrict__ out, size_t count,
                 const int64_t* __restrict__ cdt) {
    constexpr size_t kLane = 64;  // samples compared together (registers, not memory)
    for (size_t at = 0; at < count; at += kLane) {
        const size_t m = count - at < kLane ? count - at : kLane;
        int64_t u[kLane], acc[kLane];
        for (size_t i = 0; i < kLane; ++i) {
            u[i] = i < m ? static_cast<int64_t>(words[at + i] >> 1) : 0;
            acc[i] = 0;
        }
        for (int k = 0; k < kTail; ++k) {
            const int64_t c = cdt[k];
            for (size_t i = 0; i < kLane; ++i) acc[i] += static_cast<int64_t>(u[i] >= c);
        }
        for (size_t i = 0; i < m; ++i) {
            const int64_t sign = static_cast<int64_t>(words[at + i] & 1);
            out[at + i] = (acc[i] ^ -sign) + sign;
        }
        secure_wipe(u, sizeof u);
        secure_wipe(acc, sizeof acc);
    }
}

// n error samples into out (words: scratch of n).
void sample_errors(FastRandom& rng, int64_t* out, size_t n, uint64_t* words) {
    for (size_t i = 0; i < n; ++i) words[i] = rng.next();
    error_block(words, out, n, reinterpret_cast<const int64_t*>(error_cdt().data()));
    secure_wipe(words, n * sizeof(uint64_t));
}

inline int64_t ternary_sample(FastRandom& rng) {
    return static_cast<int64_t>((static_cast<u128>(rng.next()) * 3) >> 64) - 1;
}

// --- the pieces of one ciphertext -------------------------------------------------------------

// Pointers into a parsed update's payload.
struct Payload {
    const UpdateHeader& h;
    const uint8_t* data;
    // Unpacks element e (0: c0, 1: c1), tower t of ciphertext k into out (N residues), checked.
    void unpack(uint64_t k, uint64_t e, uint64_t t, uint64_t* out) const {
        const uint64_t r = k * h.residues_per_ciphertext() + (e * h.towers() + t) * h.ring_dim;
        const uint64_t at = h.byte_offset(r);
        unpack_residues(data + at, h.payload_len - at, 0, h.ring_dim, h.bits_of(r), out);
        const uint64_t q = h.moduli[t];
        uint64_t over = 0;
        for (uint64_t j = 0; j < h.ring_dim; ++j) over |= static_cast<uint64_t>(out[j] >= q);
        if (over) throw InvalidUpdateError("invalid update: a residue is not below the modulus");
    }
};

void check_header_ring(const UpdateHeader& h, const CkksRing& ring) {
    if (h.ring_dim != ring.ring_dim || h.moduli != ring.moduli)
        throw IncompatibleUpdateError("the update's ring_dim or modulus differ from the context's");
    if ((h.packing == Packing::Complex) != ring.complex_packing)
        throw IncompatibleUpdateError("the update's packing differs from the context's");
}

// s with its Shoup quotients (secret: wiped when it goes).
struct KeyTowers {
    std::vector<uint64_t> s, shoup;
    KeyTowers(const CkksRing& ring, const uint64_t* key) : s(key, key + ring.towers() * ring.ring_dim),
                                                           shoup(s.size()) {
        const uint64_t n = ring.ring_dim;
        uint64_t over = 0;
        for (size_t t = 0; t < ring.towers(); ++t) {
            const uint64_t q = ring.moduli[t];
            for (uint64_t j = 0; j < n; ++j) {
                over |= static_cast<uint64_t>(s[t * n + j] >= q);
                shoup[t * n + j] = shoup_of(csub(s[t * n + j], q), q);
            }
        }
        if (over) bad_arg("a key residue is not below its modulus");
    }
    ~KeyTowers() {
        secure_wipe(s);
        secure_wipe(shoup);
    }
    KeyTowers(const KeyTowers&) = delete;
    KeyTowers& operator=(const KeyTowers&) = delete;
};

// acc[j] = (acc[j] + x[j] * s[j]) mod q
inline void mul_acc(uint64_t* acc, const uint64_t* x, const uint64_t* s, const uint64_t* s_shoup,
                    uint64_t n, uint64_t q) {
    for (uint64_t j = 0; j < n; ++j) acc[j] = add_q(acc[j], mul_shoup(x[j], s[j], s_shoup[j], q), q);
}

// One tower q below this encodes in doubles (encode_one_tower_fp): every intermediate is exact.
constexpr uint64_t kDoublesLimit = uint64_t{1} << 50;

bool doubles_available() {
#if defined(__x86_64__) && defined(__GNUC__)
    static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    return yes;
#else
    return false;
#endif
}

#if defined(__x86_64__) && defined(__GNUC__)
#define FEDSHIELD_FMA __attribute__((target("avx2,fma")))

// encode_coefficients' rounding and reduction for one tower q < 2^50, four slots at a time in
// doubles: c = value * scale, r = llround(c) (trunc, then +-1 where the exact fraction reaches
// +-1/2), r + e (|r + e| < 2^52, exact), minus q * floor((r + e) / q) with the quotient off
// by at most one, corrected with masks: the residues the scalar loop computes. Returns how
// many slots it wrote (coefficients j and j + slots); it stops at the first group holding a
// value that is not finite or reaches 2^51 in magnitude (the scalar loop takes it from there).
// Residues of llround(c) + e mod q for four values c (|c| < 2^51; see below), to dst.
FEDSHIELD_FMA inline void fp_encode_residues(__m256d c, const int64_t* e, __m256d qd, __m256d qinv,
                                             uint64_t* dst) {
    const __m256d half = _mm256_set1_pd(0.5), one = _mm256_set1_pd(1.0);
    const __m256d zero = _mm256_setzero_pd();
    const __m256d whole = _mm256_round_pd(c, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
    const __m256d frac = _mm256_sub_pd(c, whole);
    __m256d r = _mm256_add_pd(whole, _mm256_and_pd(_mm256_cmp_pd(frac, half, _CMP_GE_OQ), one));
    r = _mm256_sub_pd(r, _mm256_and_pd(_mm256_cmp_pd(frac, _mm256_sub_pd(zero, half), _CMP_LE_OQ),
                                       one));
    if (e != nullptr) {  // small integers to doubles: add 2^52 + 2^51 as bits, subtract it
        const __m256i ei = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(e));
        const __m256i mi = _mm256_set1_epi64x(0x4338000000000000LL);
        r = _mm256_add_pd(r, _mm256_sub_pd(_mm256_castsi256_pd(_mm256_add_epi64(ei, mi)),
                                           _mm256_set1_pd(6755399441055744.0)));
    }
    const __m256d b = _mm256_floor_pd(_mm256_mul_pd(r, qinv));
    __m256d x = _mm256_fnmadd_pd(b, qd, r);  // in [-q, 2q)
    x = _mm256_add_pd(x, _mm256_and_pd(_mm256_cmp_pd(x, zero, _CMP_LT_OQ), qd));
    x = _mm256_sub_pd(x, _mm256_and_pd(_mm256_cmp_pd(x, qd, _CMP_GE_OQ), qd));
    const __m256i w = _mm256_castpd_si256(_mm256_add_pd(x, _mm256_set1_pd(4503599627370496.0)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst),
                        _mm256_xor_si256(w, _mm256_set1_epi64x(0x4330000000000000LL)));
}

FEDSHIELD_FMA uint64_t encode_one_tower_fp(const double* v, const int64_t* add, uint64_t slots,
                                           uint64_t q, double scale, uint64_t* out) {
    const __m256d qd = _mm256_set1_pd(static_cast<double>(q));
    const __m256d qinv = _mm256_set1_pd(1.0 / static_cast<double>(q));
    const __m256d sc = _mm256_set1_pd(scale), limit = _mm256_set1_pd(2251799813685248.0);  // 2^51
    const __m256d sign = _mm256_set1_pd(-0.0);
    uint64_t j = 0;
    for (; j + 4 <= slots; j += 4) {
        const __m256d a = _mm256_loadu_pd(v + 2 * j), b = _mm256_loadu_pd(v + 2 * j + 4);
        const __m256d re = _mm256_mul_pd(_mm256_permute4x64_pd(_mm256_unpacklo_pd(a, b), 0xD8), sc);
        const __m256d im = _mm256_mul_pd(_mm256_permute4x64_pd(_mm256_unpackhi_pd(a, b), 0xD8), sc);
        const __m256d ok = _mm256_and_pd(
            _mm256_cmp_pd(_mm256_andnot_pd(sign, re), limit, _CMP_LT_OQ),
            _mm256_cmp_pd(_mm256_andnot_pd(sign, im), limit, _CMP_LT_OQ));
        if (_mm256_movemask_pd(ok) != 0xF) break;  // a large or non-finite value: scalar
        fp_encode_residues(re, add ? add + j : nullptr, qd, qinv, out + j);
        fp_encode_residues(im, add ? add + slots + j : nullptr, qd, qinv, out + slots + j);
    }
    return j;
}
#endif

}  // namespace

void check_ring(const CkksRing& ring) {
    const uint64_t n = ring.ring_dim;
    if (n < 1024 || n > (uint64_t{1} << 17) || (n & (n - 1)) != 0)
        bad_arg("ring dimension " + std::to_string(n) + " is not a power of two in [1024, 2^17]");
    check_moduli(ring.moduli, "ckks ring");
    if (ring.roots.size() != ring.moduli.size()) bad_arg("one root of unity per tower is needed");
    for (size_t i = 0; i < ring.towers(); ++i) {
        const uint64_t q = ring.moduli[i], psi = ring.roots[i];
        if (psi == 0 || psi >= q || powmod(psi, n, q) != q - 1)
            bad_arg("root " + std::to_string(psi) + " is not a primitive 2N-th root mod " +
                    std::to_string(q));
    }
    if (ring.scale_bits < 1 || ring.scale_bits > 120)
        bad_arg("scale_bits " + std::to_string(ring.scale_bits) + " is not in [1, 120]");
}

NttPath ntt_auto_path(size_t n, uint64_t q) {
    if (n >= 16 && q < kAvxLimit && avx_ntt_available()) return NttPath::avx2;
    return NttPath::scalar;
}

void ntt_tower(uint64_t* a, size_t n, uint64_t q, uint64_t psi, bool inverse, NttPath path) {
    if (n < 16 || n > (size_t{1} << 17) || (n & (n - 1)) != 0)
        bad_arg("ntt: length " + std::to_string(n) + " is not a power of two in [16, 2^17]");
    if (q < 3 || (q & 1) == 0 || q >= (uint64_t{1} << 62))
        bad_arg("ntt: modulus " + std::to_string(q) + " is not an odd modulus in [3, 2^62)");
    if (psi == 0 || psi >= q || powmod(psi, n, q) != q - 1)
        bad_arg("ntt: root " + std::to_string(psi) + " is not a primitive 2N-th root mod " +
                std::to_string(q));
    for (size_t j = 0; j < n; ++j)
        if (a[j] >= q)
            bad_arg("ntt: residue " + std::to_string(a[j]) + " at " + std::to_string(j) +
                    " is not below the modulus " + std::to_string(q));
    CkksRing ring;
    ring.ring_dim = n;
    ring.moduli = {q};
    ring.roots = {psi};
    const auto tables = ring_tables(ring);
    const NttPlan& p = tables->ntt[0];
    if (static_cast<uint64_t>(static_cast<u128>(p.n_inv) * n % q) != 1)
        bad_arg("ntt: modulus " + std::to_string(q) + " is not prime (N has no inverse by Fermat)");
    if (path == NttPath::automatic) path = ntt_auto_path(n, q);
    if (path == NttPath::avx2 && !(q < kAvxLimit && avx_ntt_available()))
        bad_arg("ntt: the 64-bit AVX2 path needs q < 2^60 and a CPU with AVX2");
#if defined(__x86_64__) && defined(__GNUC__)
    if (path == NttPath::avx2) return inverse ? avx_ntt_inv(a, n, p) : avx_ntt_fwd(a, n, p);
#endif
    inverse ? ntt_inv(a, n, p) : ntt_fwd(a, n, p);
}

void special_fft(double* v, size_t n, bool inverse, FftPath path) {
    if (n < 4 || n > (size_t{1} << 17) || (n & (n - 1)) != 0)
        bad_arg("fft: ring dimension " + std::to_string(n) +
                " is not a power of two in [4, 2^17]");
    const auto tables = fft_tables(n);
    const FftTables& t = *tables;
    bool vector = false;
#if defined(__x86_64__) && defined(__GNUC__)
    vector = have_avx2() && t.slots >= 16;
#endif
    if (path == FftPath::avx2 && !vector)
        bad_arg("fft: the AVX2 path needs N >= 32 and a CPU with AVX2, N is " +
                std::to_string(n));
    if (path == FftPath::automatic) return inverse ? coefficients_from_slots(v, t)
                                                   : slots_from_coefficients(v, t);
#if defined(__x86_64__) && defined(__GNUC__)
    if (path == FftPath::avx2) return inverse ? fft_special_inv_avx2(v, t) : fft_special_avx2(v, t);
#endif
    inverse ? fft_special_inv(v, t) : fft_special(v, t);
}

void encode_coefficients(const CkksRing& ring, const double* values, const int64_t* add,
                         uint64_t* out) {
    const auto tables = ring_tables(ring);
    const FftTables& fft = *tables->fft;
    const uint64_t n = ring.ring_dim, slots = n / 2, towers = ring.towers();
    std::vector<double> v(2 * slots, 0.0);
    WipeOnExit<double> wipe_v(v);
    if (ring.complex_packing) {
        std::memcpy(v.data(), values, 2 * slots * sizeof(double));
    } else {
        for (uint64_t i = 0; i < slots; ++i) v[2 * i] = values[i];
    }
    coefficients_from_slots(v.data(), fft);
    const double scale = std::ldexp(1.0, ring.scale_bits);
    constexpr double kWord = 4611686018427387904.0;  // 2^62
    // coefficient j (value c) into its residues, one per tower
    auto coefficient = [&](uint64_t j, double c) {
        const int64_t e = add ? add[j] : 0;
        if (!std::isfinite(c))
            throw ValueRangeError("ckks: a value to encode is not finite");
        if (std::fabs(c) < kWord) {
            // std::llround(c) (half away from zero) inline, not a libm call: the truncation
            // and the fraction c - trunc(c) are exact for |c| < 2^62
            const int64_t whole = static_cast<int64_t>(c);
            const double frac = c - static_cast<double>(whole);
            // |r| <= 2^62 and e is small (an error sample): r + e fits, one reduction per tower
            const int64_t r = whole + static_cast<int64_t>(frac >= 0.5) -
                              static_cast<int64_t>(frac <= -0.5) + e;
            for (uint64_t t = 0; t < towers; ++t)
                out[t * n + j] = signed_mod(r, ring.moduli[t], tables->mu[t]);
        } else {
            // c = m * 2^x exactly, |m| < 2^53, x > 0: residue (m mod q) * (2^x mod q)
            int exp2 = 0;
            const double mant = std::frexp(c, &exp2);
            const int64_t m = static_cast<int64_t>(std::ldexp(mant, 53));
            for (uint64_t t = 0; t < towers; ++t) {
                const uint64_t q = ring.moduli[t], mu = tables->mu[t];
                const uint64_t p = tables->pow2[t][exp2 - 53];
                const uint64_t big = static_cast<uint64_t>(
                    static_cast<u128>(signed_mod(m, q, mu)) * p % q);
                out[t * n + j] = add_q(big, signed_mod(e, q, mu), q);
            }
        }
    };
    uint64_t done = 0;  // coefficients j and j + N/2 for j < done are written
#if defined(__x86_64__) && defined(__GNUC__)
    if (towers == 1 && ring.moduli[0] < kDoublesLimit && doubles_available())
        done = encode_one_tower_fp(v.data(), add, slots, ring.moduli[0], scale, out);
#endif
    for (uint64_t j = done; j < slots; ++j) {
        // coefficient j < N/2: real part of entry j; j >= N/2: imaginary part of entry j - N/2
        coefficient(j, v[2 * j] * scale);
        coefficient(j + slots, v[2 * j + 1] * scale);
    }
}

void decode_coefficients(const CkksRing& ring, const uint64_t* coeffs, double* out) {
    const auto tables = ring_tables(ring);
    const FftTables& fft = *tables->fft;
    const uint64_t n = ring.ring_dim, slots = n / 2, towers = ring.towers();
    std::vector<double> scratch;
    WipeOnExit<double> wipe_scratch(scratch);
    double* v = out;  // complex packing: the slots are the output, re/im interleaved
    if (!ring.complex_packing) {
        scratch.resize(2 * slots);
        v = scratch.data();
    }
    const double inv_scale = std::ldexp(1.0, -ring.scale_bits);
    // coefficient j as a centered integer, over the scale
    auto centered = [&](uint64_t j) -> double {
        if (towers == 1) {
            const uint64_t q = ring.moduli[0], x = coeffs[j];
            const uint64_t wrap = q & (0 - static_cast<uint64_t>(x > (q >> 1)));
            return static_cast<double>(static_cast<int64_t>(x) - static_cast<int64_t>(wrap));
        }
        long double frac = 0;
        for (uint64_t t = 0; t < towers; ++t) {
            const uint64_t q = ring.moduli[t];
            const uint64_t y = mul_shoup(coeffs[t * n + j], tables->qhat_inv[t],
                                         tables->qhat_inv_shoup[t], q);
            frac += static_cast<long double>(y) / static_cast<long double>(q);
        }
        frac -= std::nearbyint(frac);  // centered: x / Q in [-1/2, 1/2]
        return static_cast<double>(frac * tables->big_q);
    };
    for (uint64_t i = 0; i < slots; ++i) {
        v[2 * i] = centered(i) * inv_scale;
        v[2 * i + 1] = centered(i + slots) * inv_scale;
    }
    slots_from_coefficients(v, fft);
    if (!ring.complex_packing)
        for (uint64_t i = 0; i < slots; ++i) out[i] = v[2 * i];
}

void decrypt_update(const uint8_t* data, size_t len, const CkksRing& ring, const uint64_t* s,
                    const uint64_t* c1, size_t c1_len, const uint8_t* stream_keys,
                    size_t n_keys, FloodWidth w, unsigned threads, double* out,
                    size_t out_len) {
    check_ring(ring);
    const UpdateHeader h = parse_update(data, len, threads);
    check_header_ring(h, ring);
    const uint64_t n = ring.ring_dim, towers = ring.towers(), element = n * towers;
    const uint64_t per_ct = ring.values_per_ciphertext();
    if (out_len != h.n_ciphertexts * per_ct)
        bad_arg("the output holds " + std::to_string(out_len) + " values, the update " +
                std::to_string(h.n_ciphertexts * per_ct));
    const bool expand = h.seeded() && c1 == nullptr && n_keys > 0;
    if (expand && n_keys != h.n_summed)
        throw InvalidUpdateError("decrypt: " + std::to_string(n_keys) + " seed stream keys for " +
                                 std::to_string(h.n_summed) + " summed updates");
    if (h.seeded() && !expand && (c1 == nullptr || c1_len != h.n_ciphertexts * element))
        throw InvalidUpdateError("decrypt: a seeded update needs its expanded c1 (" +
                                 std::to_string(h.n_ciphertexts * element) + " residues), got " +
                                 std::to_string(c1 ? c1_len : 0));
    const KeyTowers key(ring, s);
    const Payload payload{h, data + h.header_size()};
    const auto tables = ring_tables(ring);
    parallel_ranges(h.n_ciphertexts, threads, 1, [&](unsigned, uint64_t begin, uint64_t end) {
        std::vector<uint64_t> b(element), x(n);
        WipeOnExit<uint64_t> wipe_b(b);
        std::vector<uint64_t*> parts;
        for (uint64_t t = 0; t < towers; ++t) parts.push_back(b.data() + t * n);
        for (uint64_t k = begin; k < end; ++k) {
            for (uint64_t t = 0; t < towers; ++t) {
                const uint64_t q = ring.moduli[t];
                payload.unpack(k, 0, t, parts[t]);
                const uint64_t* c1t;
                if (expand) {
                    // c1 = the sum of every summed update's a, expanded here (no full-size copy)
                    for (size_t i = 0; i < n_keys; ++i)  // the first written, the rest added
                        expand_uniform(stream_keys + 32 * i, k, static_cast<uint32_t>(t), q, n,
                                       x.data(), i != 0);
                    c1t = x.data();
                } else if (h.seeded()) {
                    c1t = c1 + k * element + t * n;
                    uint64_t over = 0;
                    for (uint64_t j = 0; j < n; ++j) over |= static_cast<uint64_t>(c1t[j] >= q);
                    if (over) bad_arg("an expanded c1 residue is not below its modulus");
                } else {
                    payload.unpack(k, 1, t, x.data());
                    c1t = x.data();
                }
                mul_acc(parts[t], c1t, key.s.data() + t * n, key.shoup.data() + t * n, n, q);
                ntt_inverse_any(parts[t], n, tables->ntt[t]);
            }
            if (w.any()) flood_coefficients(parts.data(), towers, n, ring.moduli.data(), w.hi, w.lo);
            decode_coefficients(ring, b.data(), out + k * per_ct);
        }
    });
}

static_assert(kSmudgingSigma2 == uint64_t{1} << 40, "smudging.hpp draws variance 2^40");

std::vector<std::string> partial_decrypt_update(const uint8_t* data, size_t len,
                                                const CkksRing& ring, const uint64_t* s,
                                                bool lead, FloodWidth w, unsigned threads) {
    check_ring(ring);
    const UpdateHeader h = parse_update(data, len, threads);
    check_header_ring(h, ring);
    if (h.seeded()) throw IncompatibleUpdateError("a seeded update has no c1 to decrypt with a key share");
    const uint64_t n = ring.ring_dim, towers = ring.towers(), element = n * towers;
    const KeyTowers key(ring, s);
    const Payload payload{h, data + h.header_size()};
    std::vector<std::string> out(h.n_ciphertexts);
    const uint64_t share_bytes = partial_bytes(n, ring.moduli);
    const unsigned __int128 flood_plus_smudging =
        ((static_cast<unsigned __int128>(w.hi) << 64) | w.lo) + kSmudgingSigma2;
    parallel_ranges(h.n_ciphertexts, threads, 1, [&](unsigned, uint64_t begin, uint64_t end) {
        FastRandom rng;
        std::vector<uint64_t> b(element), g(element), x(n);
        std::vector<int64_t> e(n);
        WipeOnExit<uint64_t> wipe_b(b), wipe_g(g);
        WipeOnExit<int64_t> wipe_e(e);
        std::vector<uint64_t*> parts;
        for (uint64_t t = 0; t < towers; ++t) parts.push_back(g.data() + t * n);
        const auto tables = ring_tables(ring);
        for (uint64_t k = begin; k < end; ++k) {
            // the smudging noise as an integer polynomial, then per tower (smudging.hpp: by
            // convolution, within 2^-92 of N_Z(0, 2^40)). Flooding takes the smudging's place
            // (as OpenFHE's NOISE_FLOODING_DECRYPT mode does in MultipartyDecryptLead/Main):
            // one exact Gaussian of the flooding's variance plus the smudging's, one sample per
            // coefficient instead of two.
            if (w.any())
                sample_wide_discrete_gaussian(e.data(), n, flood_plus_smudging);
            else
                sample_smudging(rng, e.data(), n);
            for (uint64_t t = 0; t < towers; ++t) {
                const uint64_t q = ring.moduli[t], mu = tables->mu[t];
                for (uint64_t j = 0; j < n; ++j) parts[t][j] = signed_mod(e[j], q, mu);
            }
            std::string share(share_bytes, '\0');
            auto* dst = reinterpret_cast<uint8_t*>(&share[0]);
            for (uint64_t t = 0; t < towers; ++t) {
                const uint64_t q = ring.moduli[t];
                uint64_t* bt = b.data() + t * n;
                ntt_forward_any(parts[t], n, tables->ntt[t]);
                if (lead) {
                    payload.unpack(k, 0, t, bt);
                    for (uint64_t j = 0; j < n; ++j) bt[j] = add_q(bt[j], parts[t][j], q);
                } else {
                    std::memcpy(bt, parts[t], n * 8);
                }
                payload.unpack(k, 1, t, x.data());
                mul_acc(bt, x.data(), key.s.data() + t * n, key.shoup.data() + t * n, n, q);
                const unsigned bits = bit_length(q);
                pack_residues(bt, n, bits, dst);
                dst += packed_bytes(n, bits);
            }
            out[k] = std::move(share);
        }
    });
    return out;
}

void fuse_partials(const std::vector<std::vector<std::pair<const uint8_t*, size_t>>>& shares,
                   const CkksRing& ring, unsigned threads, double* out, size_t out_len) {
    check_ring(ring);
    if (shares.empty()) bad_arg("no partial decryptions to fuse");
    const uint64_t n_cts = shares[0].size();
    for (const auto& party : shares)
        if (party.size() != n_cts) bad_arg("the shares hold different numbers of ciphertexts");
    const uint64_t n = ring.ring_dim, towers = ring.towers(), element = n * towers;
    const uint64_t per_ct = ring.values_per_ciphertext();
    if (out_len != n_cts * per_ct)
        bad_arg("the output holds " + std::to_string(out_len) + " values, the shares " +
                std::to_string(n_cts * per_ct));
    const auto tables = ring_tables(ring);
    const uint64_t share_bytes = partial_bytes(n, ring.moduli);
    parallel_ranges(n_cts, threads, 1, [&](unsigned, uint64_t begin, uint64_t end) {
        std::vector<uint64_t> b(element), x(n);
        WipeOnExit<uint64_t> wipe_b(b), wipe_x(x);
        for (uint64_t k = begin; k < end; ++k) {
            // each share unpacked straight into the sum (the first) or one tower's scratch,
            // checked as partial_codec.hpp's decode_partial checks it: no per-share vector
            for (size_t p = 0; p < shares.size(); ++p) {
                const uint8_t* at = shares[p][k].first;
                if (shares[p][k].second != share_bytes)
                    throw InvalidUpdateError("partial decryption: " +
                                             std::to_string(shares[p][k].second) +
                                             " bytes, expected " + std::to_string(share_bytes));
                for (uint64_t t = 0; t < towers; ++t) {
                    const uint64_t q = ring.moduli[t];
                    const unsigned bits = bit_length(q);
                    const uint64_t run = packed_bytes(n, bits);
                    uint64_t* bt = b.data() + t * n;
                    uint64_t* dst = p == 0 ? bt : x.data();
                    unpack_residues(at, run, 0, n, bits, dst);
                    at += run;
                    if (any_not_below(dst, n, q))
                        throw InvalidUpdateError("partial decryption: a residue of tower " +
                                                 std::to_string(t) +
                                                 " is not below its modulus " +
                                                 std::to_string(q));
                    if (p != 0) add_mod(bt, dst, n, q);
                }
            }
            for (uint64_t t = 0; t < towers; ++t)
                ntt_inverse_any(b.data() + t * n, n, tables->ntt[t]);
            decode_coefficients(ring, b.data(), out + k * per_ct);
        }
    });
}

std::string encrypt_update(UpdateHeader header, const CkksRing& ring, const double* values,
                           size_t n_values, const uint64_t* s, const uint64_t* a,
                           const uint8_t* a_key, const uint8_t* seed, const uint64_t* p0,
                           const uint64_t* p1, unsigned threads) {
    check_ring(ring);
    check_header_ring(header, ring);
    const uint64_t n = ring.ring_dim, towers = ring.towers(), element = n * towers;
    const uint64_t per_ct = ring.values_per_ciphertext();
    if (n_values != header.n_ciphertexts * per_ct)
        bad_arg(std::to_string(n_values) + " values for " + std::to_string(header.n_ciphertexts) +
                " ciphertexts of " + std::to_string(per_ct));
    const bool seeded = header.seeded();
    if (seeded ? (s == nullptr || (a == nullptr && a_key == nullptr) || seed == nullptr)
               : (p0 == nullptr || p1 == nullptr))
        bad_arg(seeded ? "seeded encryption needs the secret key, a and the seed"
                       : "public-key encryption needs both public-key polynomials");
    header.payload_len = header.n_ciphertexts * header.ciphertext_bytes();
    validate_header(header);
    std::unique_ptr<KeyTowers> key;
    std::vector<uint64_t> p0_shoup, p1_shoup;
    if (seeded) {
        key.reset(new KeyTowers(ring, s));
    } else {
        p0_shoup.resize(element);
        p1_shoup.resize(element);
        uint64_t over = 0;
        for (uint64_t t = 0; t < towers; ++t) {
            const uint64_t q = ring.moduli[t];
            for (uint64_t j = 0; j < n; ++j) {
                over |= static_cast<uint64_t>(p0[t * n + j] >= q) | static_cast<uint64_t>(p1[t * n + j] >= q);
                p0_shoup[t * n + j] = shoup_of(p0[t * n + j] % q, q);
                p1_shoup[t * n + j] = shoup_of(p1[t * n + j] % q, q);
            }
        }
        if (over) bad_arg("a public-key residue is not below its modulus");
    }
    std::string out(update_size(header), '\0');
    auto* bytes = reinterpret_cast<uint8_t*>(&out[0]);
    uint8_t* payload = bytes + header.header_size();
    const uint64_t wire_per_ct = header.residues_per_ciphertext();
    parallel_ranges(header.n_ciphertexts, threads, 1, [&](unsigned, uint64_t begin, uint64_t end) {
        FastRandom rng;
        std::vector<uint64_t> m(element), c1(element), v(element), a_ct(n);
        std::vector<int64_t> e(n), small(n);
        std::vector<uint64_t> words(n);
        WipeOnExit<uint64_t> wipe_m(m), wipe_c1(c1), wipe_v(v), wipe_words(words);
        WipeOnExit<int64_t> wipe_e(e), wipe_small(small);
        const auto tables = ring_tables(ring);
        for (uint64_t k = begin; k < end; ++k) {
            sample_errors(rng, e.data(), n, words.data());
            encode_coefficients(ring, values + k * per_ct, e.data(), m.data());  // m + e
            if (!seeded) {
                for (uint64_t j = 0; j < n; ++j) small[j] = ternary_sample(rng);
                for (uint64_t t = 0; t < towers; ++t)
                    for (uint64_t j = 0; j < n; ++j)
                        v[t * n + j] = signed_mod(small[j], ring.moduli[t], tables->mu[t]);
                sample_errors(rng, small.data(), n, words.data());
                for (uint64_t t = 0; t < towers; ++t)
                    for (uint64_t j = 0; j < n; ++j)
                        c1[t * n + j] = signed_mod(small[j], ring.moduli[t], tables->mu[t]);
            }
            for (uint64_t t = 0; t < towers; ++t) {
                const uint64_t q = ring.moduli[t];
                uint64_t* mt = m.data() + t * n;
                ntt_forward_any(mt, n, tables->ntt[t]);
                if (seeded) {
                    // c0 = m + e - a * s
                    const uint64_t* at = a ? a + k * element + t * n : a_ct.data();
                    if (!a) expand_uniform(a_key, k, static_cast<uint32_t>(t), q, n, a_ct.data(), false);
                    const uint64_t* st = key->s.data() + t * n;
                    const uint64_t* sh = key->shoup.data() + t * n;
                    uint64_t over = 0;
                    for (uint64_t j = 0; j < n; ++j) {
                        over |= static_cast<uint64_t>(at[j] >= q);
                        mt[j] = sub_q(mt[j], mul_shoup(at[j], st[j], sh[j], q), q);
                    }
                    if (over) bad_arg("an expanded residue of a is not below its modulus");
                } else {
                    // c0 = p0 * v + e0 + m, c1 = p1 * v + e1
                    uint64_t* vt = v.data() + t * n;
                    uint64_t* ct = c1.data() + t * n;
                    ntt_forward_any(vt, n, tables->ntt[t]);
                    ntt_forward_any(ct, n, tables->ntt[t]);
                    const uint64_t* p0t = p0 + t * n;
                    const uint64_t* p1t = p1 + t * n;
                    const uint64_t* p0s = p0_shoup.data() + t * n;
                    const uint64_t* p1s = p1_shoup.data() + t * n;
                    for (uint64_t j = 0; j < n; ++j) {
                        mt[j] = add_q(mt[j], mul_shoup(vt[j], p0t[j], p0s[j], q), q);
                        ct[j] = add_q(ct[j], mul_shoup(vt[j], p1t[j], p1s[j], q), q);
                    }
                }
            }
            for (uint64_t t = 0; t < towers; ++t) {
                const uint64_t r = k * wire_per_ct + t * n;
                pack_residues(m.data() + t * n, n, header.bits_of(r), payload + header.byte_offset(r));
                if (!seeded) {
                    const uint64_t r1 = r + element;
                    pack_residues(c1.data() + t * n, n, header.bits_of(r1),
                                  payload + header.byte_offset(r1));
                }
            }
        }
    });
    if (seeded) std::memcpy(payload + header.payload_len, seed, kSeedSize);
    seal_update(header, bytes, threads);
    return out;
}

void sample_error(int64_t* out, size_t n) {
    FastRandom rng;
    std::vector<uint64_t> words(n);
    sample_errors(rng, out, n, words.data());
}

void sample_ternary(int64_t* out, size_t n) {
    FastRandom rng;
    for (size_t i = 0; i < n; ++i) out[i] = ternary_sample(rng);
}

}  // namespace fedshield
