#include "packing.hpp"

#include <cmath>
#include <cstring>
#include <string>

#include "errors.hpp"
#include "parallel.hpp"

namespace fedshield {
namespace {

// Tensors are the unit of parallel work; small states are not worth a thread.
constexpr uint64_t kParallelThreshold = 1u << 16;

template <class T>
std::vector<uint64_t> offsets_of(const std::vector<T>& tensors, uint64_t* total) {
    std::vector<uint64_t> off(tensors.size());
    uint64_t acc = 0;
    for (size_t i = 0; i < tensors.size(); ++i) {
        off[i] = acc;
        const auto& t = tensors[i];
        if (t.mask == nullptr) {
            acc += t.numel;
        } else {
            for (uint64_t j = 0; j < t.numel; ++j) acc += t.mask[j] != 0;
        }
    }
    *total = acc;
    return off;
}

unsigned threads_for(uint64_t work, unsigned threads) {
    return work < kParallelThreshold ? 1 : threads;
}

}  // namespace

std::vector<uint64_t> kept_counts(const std::vector<TensorView>& tensors) {
    std::vector<uint64_t> counts(tensors.size());
    for (size_t i = 0; i < tensors.size(); ++i) {
        const auto& t = tensors[i];
        uint64_t c = t.numel;
        if (t.mask) {
            c = 0;
            for (uint64_t j = 0; j < t.numel; ++j) c += t.mask[j] != 0;
        }
        counts[i] = c;
    }
    return counts;
}

void pack_values(const std::vector<TensorView>& tensors, double scale, double weight_value,
                 double bound, double* out, uint64_t out_len, unsigned threads) {
    uint64_t total = 0;
    const auto off = offsets_of(tensors, &total);
    if (total + 1 > out_len)
        throw ValueRangeError("pack_values: " + std::to_string(total + 1) +
                              " values do not fit a buffer of " + std::to_string(out_len));
    parallel_ranges(tensors.size(), threads_for(total, threads), 1,
                    [&](unsigned, uint64_t begin, uint64_t end) {
        for (uint64_t i = begin; i < end; ++i) {
            const TensorView& t = tensors[i];
            double* dst = out + off[i];
            for (uint64_t j = 0; j < t.numel; ++j) {
                if (t.mask && !t.mask[j]) continue;
                const double v = static_cast<double>(t.values[j]) * scale;
                if (!(std::fabs(v) <= bound))  // also catches NaN
                    throw ValueRangeError(
                        "tensor " + std::to_string(i) + " element " + std::to_string(j) +
                        ": value " + std::to_string(t.values[j]) +
                        (std::isfinite(t.values[j])
                             ? " exceeds the CKKS headroom (|weight * value| must be <= " +
                                   std::to_string(bound) + ")"
                             : " is not finite"));
                *dst++ = v;
            }
        }
    });
    out[total] = weight_value;
    std::memset(out + total + 1, 0, (out_len - total - 1) * sizeof(double));
}

double unpack_values(const double* in, uint64_t in_len, const std::vector<TensorOut>& tensors,
                     bool divide_by_weight, unsigned threads) {
    uint64_t total = 0;
    const auto off = offsets_of(tensors, &total);
    if (total + 1 > in_len)
        throw ValueRangeError("unpack_values: the layout needs " + std::to_string(total + 1) +
                              " values, the buffer holds " + std::to_string(in_len));
    const double weight = in[total];
    if (divide_by_weight && !(weight > 0.0))
        throw ValueRangeError("unpack_values: the decrypted total weight " +
                              std::to_string(weight) + " is not positive");
    const double inv_scale = divide_by_weight ? 1.0 / weight : 1.0;
    parallel_ranges(tensors.size(), threads_for(total, threads), 1,
                    [&](unsigned, uint64_t begin, uint64_t end) {
        for (uint64_t i = begin; i < end; ++i) {
            const TensorOut& t = tensors[i];
            const double* src = in + off[i];
            for (uint64_t j = 0; j < t.numel; ++j) {
                if (t.mask && !t.mask[j]) {
                    t.values[j] = 0.0f;
                } else {
                    t.values[j] = static_cast<float>(*src++ * inv_scale);
                }
            }
        }
    });
    return weight;
}

}  // namespace fedshield
