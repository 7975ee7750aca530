// LoRA tensors <-> slot buffers. Values are compacted by an optional keep-mask, pre-weighted
// (multiplied by the client's normalised weight), checked against the CKKS headroom, and
// followed by the weight itself so the decrypted aggregate carries sum(w) beside sum(w * x).
// A float64 buffer of reals viewed as complex128 gives two reals per CKKS slot for free.
#pragma once
#include <cstdint>
#include <vector>

namespace fedshield {

struct TensorView {
    const float* values = nullptr;
    const uint8_t* mask = nullptr;  // nullptr: every value kept
    uint64_t numel = 0;
};

struct TensorOut {
    float* values = nullptr;
    const uint8_t* mask = nullptr;
    uint64_t numel = 0;
};

// Number of kept values per tensor.
std::vector<uint64_t> kept_counts(const std::vector<TensorView>& tensors);

// Writes kept values * scale, then weight_value, then zeros up to out_len.
// Throws ValueRangeError if a value is NaN/Inf or |value * scale| > bound.
void pack_values(const std::vector<TensorView>& tensors, double scale, double weight_value,
                 double bound, double* out, uint64_t out_len, unsigned threads);

// Inverse of pack_values: pruned positions get 0, kept positions the buffer value, divided by
// the weight value found right after the kept values when divide_by_weight is set (then that
// weight must be positive). Returns the weight value.
double unpack_values(const double* in, uint64_t in_len, const std::vector<TensorOut>& tensors,
                     bool divide_by_weight, unsigned threads);

}  // namespace fedshield
