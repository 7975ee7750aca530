// Fused importance scoring + pruning on the CPU: the native twin of kernels/importance.py.
// Semantics (shared with kernels/reference.py): float32 scores |w|, |w - ref| or |w * grad|;
// per segment the k smallest are pruned, ties broken by position (lower flat index first).
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace fedshield {

// Bad input to importance_mask (NaN/Inf, sizes that do not add up); mapped to ParameterError.
struct ImportanceInputError : std::invalid_argument {
    using std::invalid_argument::invalid_argument;
};

enum class Criterion : int { L1 = 0, Delta = 1, Taylor = 2 };

struct ImportanceTensor {
    const float* values = nullptr;  // the state tensor, flattened
    const float* other = nullptr;   // the reference (delta) or the gradient (taylor); else null
    uint64_t numel = 0;
};

struct ImportanceOutputs {
    uint8_t* mask = nullptr;            // one byte per value over all tensors (1 = kept)
    float* kept_values = nullptr;       // optional: the kept values in flat order
    int64_t* kept_indices = nullptr;    // optional: their flat indices (with kept_values)
};

// Tensors form one flat buffer in the given order. With global_scope there is one segment
// (n_prune has one entry), else one segment per tensor. Error messages name tensors by
// `names` and inputs by "state" / `other_label`.
void importance_mask(const std::vector<ImportanceTensor>& tensors, Criterion criterion,
                     const std::vector<uint64_t>& n_prune, bool global_scope,
                     const ImportanceOutputs& out, unsigned threads,
                     const std::vector<std::string>& names, const std::string& other_label);

}  // namespace fedshield
