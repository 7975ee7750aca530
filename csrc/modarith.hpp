// Slot-wise arithmetic on residue arrays mod one tower's modulus (inputs below q).
#pragma once
#include <cstdint>

namespace fedshield {

// True when some v[i] >= q.
bool any_not_below(const uint64_t* v, uint64_t n, uint64_t q);
// acc[i] = (acc[i] + v[i]) mod q.
void add_mod(uint64_t* acc, const uint64_t* v, uint64_t n, uint64_t q);
// acc[i] = (acc[i] - v[i]) mod q.
void sub_mod(uint64_t* acc, const uint64_t* v, uint64_t n, uint64_t q);

}  // namespace fedshield
