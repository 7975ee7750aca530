#include "flood.hpp"

#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>

#include "discrete_gaussian.hpp"
#include "errors.hpp"
#include "secure_wipe.hpp"
#include "shamir.hpp"

namespace fedshield {
namespace {

using u128 = unsigned __int128;

[[noreturn]] void bad(const std::string& what) { throw InvalidUpdateError("flooding: " + what); }

unsigned log2_exact(size_t n) {
    unsigned k = 0;
    while ((size_t{1} << k) < n) ++k;
    return k;
}

size_t bitrev(size_t x, unsigned bits) {
    size_t r = 0;
    for (unsigned i = 0; i < bits; ++i, x >>= 1) r = (r << 1) | (x & 1);
    return r;
}

inline uint64_t add_mod(uint64_t a, uint64_t b, uint64_t q) {
    const uint64_t s = a + b;  // a, b < q < 2^62: no overflow
    return s >= q ? s - q : s;
}

inline uint64_t sub_mod(uint64_t a, uint64_t b, uint64_t q) { return a >= b ? a - b : a + q - b; }

inline uint64_t mul_mod(uint64_t a, uint64_t b, uint64_t q) {
    return static_cast<uint64_t>(static_cast<u128>(a) * b % q);
}

struct Twiddles {
    std::vector<uint64_t> rev, shoup;  // psi^bitrev(k) and floor(psi^bitrev(k) * 2^64 / q)
};

// psi_rev[k] = psi^bitrev(k): the twiddles of the Cooley-Tukey negacyclic NTT, whose output is
// in bit-reversed order (Longa-Naehrig 2016, Algorithm 1), with Shoup's precomputed quotients.
// Built once per (n, q, psi): a context has a handful of towers.
std::shared_ptr<const Twiddles> twiddles(size_t n, uint64_t q, uint64_t psi) {
    static std::mutex lock;
    static std::map<std::tuple<size_t, uint64_t, uint64_t>, std::shared_ptr<const Twiddles>> cache;
    const auto key = std::make_tuple(n, q, psi);
    {
        std::lock_guard<std::mutex> guard(lock);
        auto it = cache.find(key);
        if (it != cache.end()) return it->second;
    }
    const unsigned logn = log2_exact(n);
    auto t = std::make_shared<Twiddles>();
    std::vector<uint64_t> pow(n);
    pow[0] = 1;
    for (size_t k = 1; k < n; ++k) pow[k] = mul_mod(pow[k - 1], psi, q);
    t->rev.resize(n);
    t->shoup.resize(n);
    for (size_t k = 0; k < n; ++k) {
        t->rev[k] = pow[bitrev(k, logn)];
        t->shoup[k] = static_cast<uint64_t>((static_cast<u128>(t->rev[k]) << 64) / q);
    }
    std::lock_guard<std::mutex> guard(lock);
    if (cache.size() > 64) cache.clear();  // bounded: tests and tools may cycle contexts
    cache.emplace(key, t);
    return t;
}

// The arguments of both transforms: a power-of-two ring, q < 2^62, psi of order 2N mod q.
void check_ntt_args(size_t n, uint64_t q, uint64_t psi) {
    const unsigned logn = log2_exact(n);
    if (n < 2 || n > (size_t{1} << 17) || (size_t{1} << logn) != n)
        bad("ring dimension " + std::to_string(n) + " is not a power of two in [2, 131072]");
    if (q < 3 || q >= (uint64_t{1} << 62)) bad("modulus is not in [3, 2^62)");
    if (psi == 0 || psi >= q || powmod(psi, n, q) != q - 1)
        bad("root " + std::to_string(psi) + " is not a primitive 2N-th root of unity mod q");
}

}  // namespace

void ntt_forward(uint64_t* a, size_t n, uint64_t q, uint64_t psi) {
    check_ntt_args(n, q, psi);
    // Products by a fixed twiddle use Shoup's precomputed quotient floor(s * 2^64 / q): one
    // high multiply and one correction instead of a 128-bit division (q < 2^62).
    const auto tw = twiddles(n, q, psi);
    const uint64_t* psi_rev = tw->rev.data();
    const uint64_t* psi_shoup = tw->shoup.data();
    size_t t = n;
    for (size_t m = 1; m < n; m <<= 1) {
        t >>= 1;
        for (size_t i = 0; i < m; ++i) {
            const size_t j1 = 2 * i * t;
            const uint64_t s = psi_rev[m + i], s_shoup = psi_shoup[m + i];
            for (size_t j = j1; j < j1 + t; ++j) {
                const uint64_t u = a[j], x = a[j + t];
                const uint64_t hi = static_cast<uint64_t>((static_cast<u128>(x) * s_shoup) >> 64);
                uint64_t v = x * s - hi * q;  // in [0, 2q): exact mod 2^64
                if (v >= q) v -= q;
                a[j] = add_mod(u, v, q);
                a[j + t] = sub_mod(u, v, q);
            }
        }
    }
}

void ntt_inverse(uint64_t* a, size_t n, uint64_t q, uint64_t psi) {
    check_ntt_args(n, q, psi);
    // Gentleman-Sande with the inverse root's twiddles (Longa-Naehrig 2016, Algorithm 2): the
    // exact inverse of ntt_forward, bit-reversed evaluations back to natural coefficients.
    const auto tw = twiddles(n, q, powmod(psi, 2 * n - 1, q));
    const uint64_t* inv_rev = tw->rev.data();
    const uint64_t* inv_shoup = tw->shoup.data();
    size_t t = 1;
    for (size_t m = n; m > 1; m >>= 1) {
        const size_t h = m >> 1;
        for (size_t i = 0, j1 = 0; i < h; ++i, j1 += 2 * t) {
            const uint64_t s = inv_rev[h + i], s_shoup = inv_shoup[h + i];
            for (size_t j = j1; j < j1 + t; ++j) {
                const uint64_t u = a[j], x = sub_mod(a[j], a[j + t], q);
                a[j] = add_mod(u, a[j + t], q);
                const uint64_t hi = static_cast<uint64_t>((static_cast<u128>(x) * s_shoup) >> 64);
                uint64_t v = x * s - hi * q;
                if (v >= q) v -= q;
                a[j + t] = v;
            }
        }
        t <<= 1;
    }
    const uint64_t n_inv = powmod(static_cast<uint64_t>(n) % q, q - 2, q);
    const uint64_t n_inv_shoup = static_cast<uint64_t>((static_cast<u128>(n_inv) << 64) / q);
    for (size_t j = 0; j < n; ++j) {
        const uint64_t hi = static_cast<uint64_t>((static_cast<u128>(a[j]) * n_inv_shoup) >> 64);
        const uint64_t v = a[j] * n_inv - hi * q;
        a[j] = v >= q ? v - q : v;
    }
}

void flood_coefficients(uint64_t* const* towers, size_t count, size_t n, const uint64_t* moduli,
                        uint64_t v_hi, uint64_t v_lo) {
    const u128 sigma2 = (static_cast<u128>(v_hi) << 64) | v_lo;
    if (sigma2 == 0 || sigma2 >= kMaxWideSigma2)
        bad("the flooding variance must be in [1, 2^112)");
    for (size_t i = 0; i < count; ++i)
        if (moduli[i] < 3 || moduli[i] >= (uint64_t{1} << 62)) bad("a modulus is not in [3, 2^62)");
    std::vector<int64_t> f(n);
    WipeOnExit<int64_t> wipe_f(f);
    sample_wide_discrete_gaussian(f.data(), n, sigma2);
    for (size_t i = 0; i < count; ++i) {
        const uint64_t q = moduli[i];
        uint64_t* dst = towers[i];
        for (size_t j = 0; j < n; ++j) {
            // |f_j| < 2^63: its residue, then added (branch on the sign of noise, not of a key)
            const uint64_t mag = f[j] < 0 ? 0 - static_cast<uint64_t>(f[j])
                                          : static_cast<uint64_t>(f[j]);
            const uint64_t r = mag % q;
            dst[j] = add_mod(dst[j], f[j] < 0 ? sub_mod(0, r, q) : r, q);
        }
    }
}

void flood_towers(const std::vector<uint64_t*>& towers, size_t n,
                  const std::vector<uint64_t>& moduli, const std::vector<uint64_t>& roots,
                  uint64_t v_hi, uint64_t v_lo) {
    if (towers.empty() || towers.size() != moduli.size() || towers.size() != roots.size())
        bad("one modulus and one root per tower are needed");
    for (uint64_t q : moduli)
        if (q < 3 || q >= (uint64_t{1} << 62)) bad("a modulus is not in [3, 2^62)");
    for (size_t i = 0; i < towers.size(); ++i)
        for (size_t j = 0; j < n; ++j)
            if (towers[i][j] >= moduli[i]) bad("a residue is not below its modulus");
    // The flooding polynomial in coefficient form, then in each tower's evaluation form.
    std::vector<uint64_t> f(towers.size() * n, 0);
    WipeOnExit<uint64_t> wipe_f(f);
    std::vector<uint64_t*> parts;
    for (size_t i = 0; i < towers.size(); ++i) parts.push_back(f.data() + i * n);
    flood_coefficients(parts.data(), parts.size(), n, moduli.data(), v_hi, v_lo);
    for (size_t i = 0; i < towers.size(); ++i) {
        const uint64_t q = moduli[i];
        ntt_forward(parts[i], n, q, roots[i]);
        uint64_t* dst = towers[i];
        for (size_t j = 0; j < n; ++j) dst[j] = add_mod(dst[j], parts[i][j], q);
    }
}

}  // namespace fedshield
