#include "shamir.hpp"

#include <string>

#include "ciphertext_layout.hpp"
#include "errors.hpp"
#include "secure_wipe.hpp"

namespace fedshield {
namespace {


void check_modulus(uint64_t modulus) {
    if (modulus < 3 || modulus >= (uint64_t{1} << 62) || modulus % 2 == 0)
        throw ShamirInputError("shamir: modulus " + std::to_string(modulus) +
                              " is not an odd modulus in [3, 2**62)");
}

// Uniform values mod q: draw bit_length(q) bits, reject those >= q (accepts > 1/2 of draws).
void uniform_mod(uint64_t* out, size_t n, uint64_t modulus) {
    unsigned bits = 0;
    while (bits < 64 && (modulus >> bits) != 0) ++bits;
    const uint64_t mask = bits >= 64 ? ~uint64_t{0} : (uint64_t{1} << bits) - 1;
    std::vector<uint64_t> pool(n + 64);  // draws are polynomial coefficients: secret
    WipeOnExit<uint64_t> wipe_pool(pool);
    size_t filled = 0;
    while (filled < n) {
        random_bytes(reinterpret_cast<uint8_t*>(pool.data()), pool.size() * 8);
        for (uint64_t v : pool) {
            v &= mask;
            if (v < modulus && filled < n) out[filled++] = v;
        }
    }
}

}  // namespace

uint64_t mulmod(uint64_t a, uint64_t b, uint64_t modulus) {
    return static_cast<uint64_t>(static_cast<unsigned __int128>(a) * b % modulus);
}

uint64_t powmod(uint64_t a, uint64_t e, uint64_t modulus) {
    uint64_t r = 1 % modulus;
    a %= modulus;
    for (; e; e >>= 1, a = mulmod(a, a, modulus))
        if (e & 1) r = mulmod(r, a, modulus);
    return r;
}

std::vector<uint64_t> locate_key_residues(const uint8_t* data, size_t len, uint64_t ring_dim,
                                          const std::vector<uint64_t>& moduli) {
    return find_residue_arrays(data, len, ring_dim, moduli, "secret key", moduli.size());
}

std::vector<std::vector<uint64_t>> shamir_split(const uint64_t* secret, size_t n, uint64_t modulus,
                                                unsigned threshold,
                                                const std::vector<uint64_t>& xs) {
    check_modulus(modulus);
    if (threshold < 1 || threshold > xs.size())
        throw ShamirInputError("shamir: threshold " + std::to_string(threshold) +
                              " must be in [1, " + std::to_string(xs.size()) + "]");
    for (size_t k = 0; k < xs.size(); ++k) {
        if (xs[k] % modulus == 0) throw ShamirInputError("shamir: a point is 0 mod q");
        for (size_t j = 0; j < k; ++j)
            if (xs[j] % modulus == xs[k] % modulus)
                throw ShamirInputError("shamir: points must be distinct mod q");
    }
    for (size_t i = 0; i < n; ++i)
        if (secret[i] >= modulus) throw ShamirInputError("shamir: secret residue not below q");
    // coefficients a_1..a_{t-1}, each n values
    std::vector<uint64_t> coeffs(static_cast<size_t>(threshold - 1) * n);
    WipeOnExit<uint64_t> wipe_coeffs(coeffs);  // the polynomial determines the secret
    uniform_mod(coeffs.data(), coeffs.size(), modulus);
    std::vector<std::vector<uint64_t>> out(xs.size(), std::vector<uint64_t>(n));
    for (size_t k = 0; k < xs.size(); ++k) {
        const uint64_t x = xs[k] % modulus;
        uint64_t* dst = out[k].data();
        // Horner: (((a_{t-1} x + a_{t-2}) x + ...) x + s)
        for (size_t i = 0; i < n; ++i) {
            uint64_t acc = 0;
            for (size_t d = threshold - 1; d >= 1; --d) {
                acc = mulmod(acc, x, modulus) + coeffs[(d - 1) * n + i];
                if (acc >= modulus) acc -= modulus;
            }
            acc = mulmod(acc, x, modulus) + secret[i];
            if (acc >= modulus) acc -= modulus;
            dst[i] = acc;
        }
    }
    return out;
}

uint64_t lagrange_at_zero(const std::vector<uint64_t>& xs, size_t index, uint64_t modulus) {
    check_modulus(modulus);
    if (index >= xs.size()) throw ShamirInputError("lagrange: index out of range");
    uint64_t num = 1, den = 1;
    const uint64_t xi = xs[index] % modulus;
    for (size_t j = 0; j < xs.size(); ++j) {
        if (j == index) continue;
        const uint64_t xj = xs[j] % modulus;
        if (xj == xi) throw ShamirInputError("lagrange: points must be distinct mod q");
        num = mulmod(num, xj, modulus);                               // prod x_j
        den = mulmod(den, (xj + modulus - xi) % modulus, modulus);   // prod (x_j - x_i)
    }
    return mulmod(num, powmod(den, modulus - 2, modulus), modulus);  // q prime: Fermat inverse
}

void cover_absent(const uint64_t* own, const std::vector<const uint64_t*>& shares, size_t n,
                  uint64_t coefficient, uint64_t modulus, uint64_t* out) {
    check_modulus(modulus);
    for (size_t i = 0; i < n; ++i) {
        uint64_t sum = 0;
        for (const uint64_t* s : shares) {
            if (s[i] >= modulus) throw ShamirInputError("cover_absent: share residue not below q");
            sum += s[i];
            if (sum >= modulus) sum -= modulus;
        }
        if (own[i] >= modulus) throw ShamirInputError("cover_absent: key residue not below q");
        uint64_t v = own[i] + mulmod(coefficient % modulus, sum, modulus);
        if (v >= modulus) v -= modulus;
        out[i] = v;
    }
}

}  // namespace fedshield
