#include "discrete_gaussian.hpp"

#include <string>

#include "csprng.hpp"
#include "parallel.hpp"
#include "secure_wipe.hpp"

namespace fedshield {
namespace {

using u128 = unsigned __int128;

// Laplace draws beyond this are rejected outright: their Gaussian acceptance probability is
// below exp(-2^33), so the output distribution moves by less than that (and (|y| t)^2 must
// fit 128 bits: |y| < 2^40, t <= 2^23 + 1).
constexpr uint64_t kMaxAbs = uint64_t{1} << 40;
// Algorithm 1 divides by k = 1, 2, ...; P(k > 2^20) < 1/(2^20)!: never reached, but bounded
// so that den * k fits 128 bits (den < 2^100 here).
constexpr uint64_t kMaxK = uint64_t{1} << 20;

// Bits and uniform integers from the kernel CSPRNG, drawn in blocks; the block is wiped.
class RandomBits {
public:
    RandomBits() = default;
    RandomBits(const RandomBits&) = delete;
    RandomBits& operator=(const RandomBits&) = delete;
    ~RandomBits() {
        secure_wipe(block_, sizeof block_);
        secure_wipe(&word_, sizeof word_);
    }

    unsigned bit() {
        if (bits_ == 0) {
            word_ = next_word();
            bits_ = 64;
        }
        const unsigned b = static_cast<unsigned>(word_ & 1);
        word_ >>= 1;
        --bits_;
        return b;
    }

    // Uniform in [0, n) for n >= 1 (rejection on bit_length(n - 1) bits).
    uint64_t below(uint64_t n) {
        if (n <= 1) return 0;
        const unsigned bits = 64 - static_cast<unsigned>(__builtin_clzll(n - 1));
        const uint64_t mask = bits == 64 ? ~uint64_t{0} : (uint64_t{1} << bits) - 1;
        for (;;) {
            const uint64_t v = next_word() & mask;
            if (v < n) return v;
        }
    }

private:
    uint64_t next_word() {
        if (used_ == kWords) {
            random_bytes(reinterpret_cast<uint8_t*>(block_), sizeof block_);
            used_ = 0;
        }
        return block_[used_++];
    }

    static constexpr size_t kWords = 512;
    uint64_t block_[kWords];
    size_t used_ = kWords;
    uint64_t word_ = 0;
    unsigned bits_ = 0;
};

// Bernoulli(num / den), num <= den, den < 2^127: compares a uniform U in [0, 1), one random
// bit at a time, with the binary expansion of num / den (2 bits expected, exact).
bool bernoulli(RandomBits& rng, u128 num, u128 den) {
    if (num >= den) return true;
    if (num == 0) return false;
    u128 r = num;
    for (;;) {
        r <<= 1;  // r < den < 2^127
        unsigned b = 0;
        if (r >= den) {
            b = 1;
            r -= den;
        }
        const unsigned u = rng.bit();
        if (u != b) return u < b;
        if (r == 0) return false;  // the expansion ends: U >= num / den (U = it has mass 0)
    }
}

// Bernoulli(exp(-num / den)) for num <= den (CKS Algorithm 1, gamma in [0, 1]).
bool bernoulli_exp_at_most_1(RandomBits& rng, u128 num, u128 den) {
    uint64_t k = 1;
    while (bernoulli(rng, num, den * k)) {
        if (++k > kMaxK) throw ParameterInputError("discrete Gaussian: Algorithm 1 ran away");
    }
    return k & 1;
}

// Bernoulli(exp(-num / den)) for any num / den >= 0 (CKS Algorithm 1): one Bernoulli(1/e) per
// whole unit of the exponent, then the fractional rest.
bool bernoulli_exp(RandomBits& rng, u128 num, u128 den) {
    while (num > den) {
        if (!bernoulli_exp_at_most_1(rng, 1, 1)) return false;
        num -= den;
    }
    return bernoulli_exp_at_most_1(rng, num, den);
}

// The discrete Laplace distribution of scale t: P(y) proportional to exp(-|y| / t)
// (CKS Algorithm 2 with s = 1). Returns the magnitude and the sign separately.
uint64_t discrete_laplace(RandomBits& rng, uint64_t t, bool* negative) {
    for (;;) {
        const uint64_t u = rng.below(t);
        if (!bernoulli_exp(rng, u, t)) continue;
        uint64_t v = 0;
        while (bernoulli_exp_at_most_1(rng, 1, 1)) ++v;
        const u128 x = static_cast<u128>(u) + static_cast<u128>(t) * v;
        const bool b = rng.bit();
        if (b && x == 0) continue;
        if (x >= kMaxAbs) continue;  // see kMaxAbs
        *negative = b;
        return static_cast<uint64_t>(x);
    }
}

// floor(sqrt(n)) by the bitwise method, for 64- and 128-bit n (exact, no floating point).
template <typename U>
U isqrt(U n) {
    U r = 0;
    for (U bit = U{1} << (8 * sizeof(U) - 2); bit; bit >>= 2) {
        if (n >= r + bit) {
            n -= r + bit;
            r = (r >> 1) + bit;
        } else {
            r >>= 1;
        }
    }
    return r;
}

// One N_Z(0, sigma2) sample (CKS Algorithm 3 with sigma^2 = sigma2 an integer):
// t = floor(sigma) + 1; y ~ Lap_Z(t), kept with probability
// exp(-(|y| - sigma2/t)^2 / (2 sigma2)) = exp(-(|y| t - sigma2)^2 / (2 sigma2 t^2)).
int64_t discrete_gaussian(RandomBits& rng, uint64_t sigma2) {
    const uint64_t t = isqrt<uint64_t>(sigma2) + 1;
    const u128 den = 2 * static_cast<u128>(sigma2) * t * t;  // < 2^94
    for (;;) {
        bool negative = false;
        const uint64_t y = discrete_laplace(rng, t, &negative);
        const u128 yt = static_cast<u128>(y) * t;  // < 2^64
        const u128 diff = yt >= sigma2 ? yt - sigma2 : sigma2 - yt;
        if (bernoulli_exp(rng, diff * diff, den))
            return negative ? -static_cast<int64_t>(y) : static_cast<int64_t>(y);
    }
}

// --- wide variances (noise flooding): the same algorithm with 256-bit intermediates -------

// An unsigned 256-bit integer: just what Bernoulli(exp(-num / den)) needs.
struct U256 {
    u128 hi = 0, lo = 0;
};

bool operator<(const U256& a, const U256& b) { return a.hi != b.hi ? a.hi < b.hi : a.lo < b.lo; }
bool is_zero(const U256& a) { return a.hi == 0 && a.lo == 0; }

U256 sub(const U256& a, const U256& b) {  // a >= b
    U256 r;
    r.lo = a.lo - b.lo;
    r.hi = a.hi - b.hi - (a.lo < b.lo ? 1 : 0);
    return r;
}

U256 shl1(const U256& a) { return {(a.hi << 1) | (a.lo >> 127), a.lo << 1}; }

// a * b for 128-bit a, b (schoolbook on 64-bit halves).
U256 mul(u128 a, u128 b) {
    const u128 m = ~uint64_t{0};
    const u128 a0 = a & m, a1 = a >> 64, b0 = b & m, b1 = b >> 64;
    const u128 p00 = a0 * b0, p01 = a0 * b1, p10 = a1 * b0, p11 = a1 * b1;
    const u128 mid = (p00 >> 64) + (p01 & m) + (p10 & m);  // < 3 * 2^64
    U256 r;
    r.lo = (p00 & m) | (mid << 64);
    r.hi = p11 + (p01 >> 64) + (p10 >> 64) + (mid >> 64);
    return r;
}

// a * k for a < 2^236 and k <= 2^20: fits.
U256 mul_small(const U256& a, uint64_t k) {
    const U256 low = mul(a.lo, k);
    return {a.hi * k + low.hi, low.lo};
}

// Bernoulli(num / den) for num, den < 2^255 (see bernoulli above).
bool bernoulli(RandomBits& rng, U256 num, const U256& den) {
    if (!(num < den)) return true;
    if (is_zero(num)) return false;
    U256 r = num;
    for (;;) {
        r = shl1(r);
        unsigned b = 0;
        if (!(r < den)) {
            b = 1;
            r = sub(r, den);
        }
        const unsigned u = rng.bit();
        if (u != b) return u < b;
        if (is_zero(r)) return false;
    }
}

bool bernoulli_exp_at_most_1(RandomBits& rng, const U256& num, const U256& den) {
    uint64_t k = 1;
    while (bernoulli(rng, num, mul_small(den, k))) {
        if (++k > kMaxK) throw ParameterInputError("discrete Gaussian: Algorithm 1 ran away");
    }
    return k & 1;
}

bool bernoulli_exp(RandomBits& rng, U256 num, const U256& den) {
    while (den < num) {
        if (!bernoulli_exp_at_most_1(rng, 1, 1)) return false;
        num = sub(num, den);
    }
    return bernoulli_exp_at_most_1(rng, num, den);
}

// One N_Z(0, sigma2) sample for sigma2 < 2^112 (CKS Algorithm 3, as discrete_gaussian above):
// t = floor(sigma) + 1 <= 2^56 + 1; Laplace draws of magnitude >= 64 t are rejected outright
// (their acceptance probability is below exp(-(63 sigma)^2 / (2 sigma^2)) < exp(-1900)).
struct WideGaussian {
    explicit WideGaussian(u128 s2)
        : sigma2(s2), t(static_cast<uint64_t>(isqrt<u128>(s2)) + 1), cap(64 * t),
          den(shl1(mul(s2, static_cast<u128>(t) * t))) {}
    u128 sigma2;
    uint64_t t, cap;  // cap < 2^63
    U256 den;         // 2 sigma2 t^2 < 2^227
};

int64_t wide_discrete_gaussian(RandomBits& rng, const WideGaussian& g) {
    const u128 sigma2 = g.sigma2;
    const uint64_t t = g.t, cap = g.cap;
    const U256& den = g.den;
    for (;;) {
        // the discrete Laplace of scale t (CKS Algorithm 2), as discrete_laplace above
        const uint64_t u = rng.below(t);
        if (!bernoulli_exp(rng, u, t)) continue;
        uint64_t v = 0;
        while (bernoulli_exp_at_most_1(rng, 1, 1)) {
            if (++v >= 64) break;  // u + t v >= 64 t: rejected below anyway
        }
        const u128 x = static_cast<u128>(u) + static_cast<u128>(t) * v;
        const bool negative = rng.bit();
        if (negative && x == 0) continue;
        if (x >= cap) continue;
        const u128 yt = x * t;  // < 2^119
        const u128 diff = yt >= sigma2 ? yt - sigma2 : sigma2 - yt;
        if (bernoulli_exp(rng, mul(diff, diff), den))
            return negative ? -static_cast<int64_t>(x) : static_cast<int64_t>(x);
    }
}

}  // namespace

void add_discrete_gaussian(int64_t* values, uint64_t n, uint64_t sigma2, unsigned threads) {
    if (sigma2 < 1 || sigma2 > kMaxSigma2)
        throw ParameterInputError("discrete Gaussian: variance parameter " +
                                  std::to_string(sigma2) + " is not in [1, 2**46]");
    constexpr int64_t kLimit = int64_t{1} << 62;
    for (uint64_t i = 0; i < n; ++i)
        if (values[i] >= kLimit || values[i] <= -kLimit)
            throw ParameterInputError("discrete Gaussian: value " + std::to_string(values[i]) +
                                      " at index " + std::to_string(i) +
                                      " is not within (-2**62, 2**62)");
    parallel_ranges(n, threads, 1, [&](unsigned, uint64_t begin, uint64_t end) {
        RandomBits rng;  // one CSPRNG stream per thread
        for (uint64_t i = begin; i < end; ++i) values[i] += discrete_gaussian(rng, sigma2);
    });
}

unsigned __int128 squared_norm(const int64_t* values, uint64_t n) {
    const u128 top = ~u128{0};
    u128 sum = 0;
    for (uint64_t i = 0; i < n; ++i) {
        const uint64_t a = values[i] < 0 ? 0 - static_cast<uint64_t>(values[i])
                                         : static_cast<uint64_t>(values[i]);
        const u128 sq = static_cast<u128>(a) * a;
        if (top - sum < sq) return top;
        sum += sq;
    }
    return sum;
}

void sample_wide_discrete_gaussian(int64_t* out, uint64_t n, unsigned __int128 sigma2) {
    if (sigma2 < 1 || sigma2 >= kMaxWideSigma2)
        throw ParameterInputError("discrete Gaussian: flooding variance of " +
                                  std::to_string(static_cast<double>(sigma2)) +
                                  " is not in [1, 2**112)");
    RandomBits rng;
    const WideGaussian g(sigma2);
    for (uint64_t i = 0; i < n; ++i) out[i] = wide_discrete_gaussian(rng, g);
}

}  // namespace fedshield
