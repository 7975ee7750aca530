// Slot-wise arithmetic on residue arrays mod one tower's modulus (inputs below q).
#pragma once
#include <cstdint>

// Loops that vectorise with AVX2 get an AVX2 clone picked at load time where the CPU has it
// (a portable build keeps its default).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FEDSHIELD_SIMD_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define FEDSHIELD_SIMD_CLONES
#endif

namespace fedshield {

// True when some v[i] >= q.
bool any_not_below(const uint64_t* v, uint64_t n, uint64_t q);
// acc[i] = (acc[i] + v[i]) mod q.
void add_mod(uint64_t* acc, const uint64_t* v, uint64_t n, uint64_t q);
// acc[i] = (acc[i] - v[i]) mod q.
void sub_mod(uint64_t* acc, const uint64_t* v, uint64_t n, uint64_t q);

}  // namespace fedshield
