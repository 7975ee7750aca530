// DP noise an attacker cannot exploit: exact samples of the discrete Gaussian N_Z(0, sigma2)
// (Canonne, Kamath, Steinke, "The Discrete Gaussian for Differential Privacy", NeurIPS 2020,
// Algorithms 1-3) for an integer variance parameter sigma2, drawn with integer arithmetic only
// from the kernel CSPRNG. No floating point touches the noise, so the released values are
// exactly update + noise on an integer grid: the attacks on floating-point Gaussian noise
// (Mironov, CCS 2012) and on a predictable generator (MT19937) have nothing to work with.
#pragma once
#include <cstdint>

#include "errors.hpp"

namespace fedshield {

// sigma2 must be in [1, 2^46]: every intermediate of the exact sampler then fits 128 bits.
// ParameterInputError for a variance or a value out of range.
constexpr uint64_t kMaxSigma2 = uint64_t{1} << 46;

// values[i] += a fresh N_Z(0, sigma2) sample, for i < n, on up to `threads` threads (each with
// its own CSPRNG stream). |values[i]| must stay below 2^62.
void add_discrete_gaussian(int64_t* values, uint64_t n, uint64_t sigma2, unsigned threads);

// Noise flooding needs variances far beyond kMaxSigma2 (sigma around 2^50): the same exact
// algorithm with 256-bit intermediates, for sigma2 in [1, kMaxWideSigma2).
constexpr unsigned __int128 kMaxWideSigma2 = static_cast<unsigned __int128>(1) << 112;

// out[i] = a fresh N_Z(0, sigma2) sample, for i < n, on the calling thread. Draws whose
// magnitude reaches 64 * (floor(sigma) + 1) are rejected (acceptance below exp(-1900)), so
// |out[i]| < 2^63. ParameterInputError for a variance out of range.
void sample_wide_discrete_gaussian(int64_t* out, uint64_t n, unsigned __int128 sigma2);

// sum(values[i]^2) exactly, saturating at 2^128 - 1.
unsigned __int128 squared_norm(const int64_t* values, uint64_t n);

}  // namespace fedshield
