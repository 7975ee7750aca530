#include "modarith.hpp"

namespace fedshield {

// The residue loops vectorise with AVX2 (unsigned 64-bit compares): FEDSHIELD_SIMD_CLONES.

FEDSHIELD_SIMD_CLONES
bool any_not_below(const uint64_t* v, uint64_t n, uint64_t q) {
    uint64_t bad = 0;
    for (uint64_t i = 0; i < n; ++i) bad |= v[i] >= q;
    return bad != 0;
}

FEDSHIELD_SIMD_CLONES
void add_mod(uint64_t* acc, const uint64_t* v, uint64_t n, uint64_t q) {
    for (uint64_t i = 0; i < n; ++i) {
        const uint64_t s = acc[i] + v[i];
        acc[i] = s >= q ? s - q : s;
    }
}

FEDSHIELD_SIMD_CLONES
void sub_mod(uint64_t* acc, const uint64_t* v, uint64_t n, uint64_t q) {
    for (uint64_t i = 0; i < n; ++i) {
        const uint64_t a = acc[i], b = v[i];
        acc[i] = a >= b ? a - b : a + q - b;
    }
}

}  // namespace fedshield
