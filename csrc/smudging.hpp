// The smudging noise of a threshold partial decryption: N_Z(0, 2^40), OpenFHE's
// NoiseFlooding::MP_SD = 2^20 (ckks.hpp), drawn by convolution instead of the exact but slow
// rejection sampler of discrete_gaussian.hpp.
//
// Micciancio and Walter, "Gaussian Sampling over the Integers: Efficient, Generic,
// Constant-Time" (CRYPTO 2017), Theorem 3 (after Peikert, CRYPTO 2010, Theorem 3.1): for
// independent y_i ~ D_{Z, sigma_i} and coprime integers z_i with every
// sigma_i >= sqrt(2) * max|z_i| * eta_eps(Z), sum z_i y_i is within max-log distance 2 eps of
// D_{Z, sigma} with sigma^2 = sum z_i^2 sigma_i^2. Here (their SampleI, three levels):
//   y ~ D_{Z, sigma0},  a = 4 y + 3 y',  b = 20 a + 19 a',  x = 505 b + 504 b'
// from eight independent base draws y, with sigma0^2 = 2^40 / (25 * 761 * 509041), so that
// x's sigma^2 is 2^40 exactly. eps = 2^-100: every level meets the condition (checked when the
// table is built, and by tests/test_native_ckks.py from kSmudging*). The base draws come from a
// cumulative table of 126-bit thresholds. A uniform 63-bit word's top 31 bits are compared
// with the top 31 bits of the thresholds up to the first whose top is 2^31 - 1 (67 of them;
// no branch, no look-up by value, eight draws per AVX2 instruction); where they equal one
// (probability below 2^-24) the draw is settled by comparing every bit of every threshold,
// 63 more uniform bits standing for the low halves. Two settles run per block of draws
// whether or not any draw tied, on words gathered by masked passes; a block with more ties
// (probability below 2^-44 per 2048 draws) settles the rest in a plain loop. The tail
// |y| > kSmudgingTable (mass below 2^-100) folds into |y| = kSmudgingTable. The table is
// computed in binary128 (each threshold within 2^-100 of the exact CDF, which the tests
// check), so one base draw is within statistical distance 2^-96 of D_{Z, sigma0}, and one
// sample x within 8 * 2^-96 + 7 * 2 * 2^-100 < 2^-92 of N_Z(0, 2^40) (docs/THREAT_MODEL.md).
#pragma once
#include <cstddef>
#include <cstdint>

namespace fedshield {

class FastRandom;

// The parameters above, for the tests to check the convolution's conditions on their own.
constexpr int kSmudgingEpsBits = 100;
constexpr uint64_t kSmudgingLevels[3][2] = {{4, 3}, {20, 19}, {505, 504}};
// sigma0^2 = 2^40 / kSmudgingBaseDivisor = 2^40 / prod(z^2 + w^2)
constexpr uint64_t kSmudgingBaseDivisor = 25ull * 761ull * 509041ull;
// thresholds of the base table: |y| in [0, kSmudgingTable]
constexpr int kSmudgingTable = 126;

// out[i] = a fresh smudging sample, for i < n, from rng.
void sample_smudging(FastRandom& rng, int64_t* out, size_t n);

// n draws of the base Gaussian D_{Z, sigma0} (for the tests).
void sample_smudging_base(FastRandom& rng, int64_t* out, size_t n);

// Base draws from the given uniform words as one block (for the tests: words at the table's
// thresholds reach every path), extra[] giving in order the bits each settled tie draws.
// Throws ParameterInputError when extra runs out.
void smudging_base_from_words(const uint64_t* words, size_t n, const uint64_t* extra,
                              size_t n_extra, int64_t* out);

// The base table's thresholds: P(|y| <= k) ~ (hi[k] * 2^63 + lo[k]) / 2^126 (for the tests).
void smudging_table(uint64_t* hi, uint64_t* lo);

}  // namespace fedshield
