// Streaming server-side aggregation: each update is validated, then its residues are added
// mod q_i (each residue mod its RNS tower's modulus) into one accumulator. Memory is one
// update's residues (and, for seeded updates, 32 bytes per client), whatever the number of
// clients. An update that fails validation half-way is subtracted back out, so it never
// poisons the sum.
#pragma once
#include <cstddef>
#include <array>
#include <cstdint>
#include <set>
#include <string>
#include <vector>

#include "wire.hpp"

namespace fedshield {

// What the server knows about the round before any update arrives. Without it the first
// accepted update would fix the round, layout, mask and weight bound for everyone after it,
// so one hostile first reply could get every honest one rejected.
struct RoundExpectations {
    Packing packing = Packing::Complex;  // from the server's parameters: always checked
    uint8_t elements = 2;                // likewise: 1 = seeded updates (c0 and a seed)
    bool allow_aggregates = false;       // accept partial aggregates (kind 2), e.g. tree reduce
    bool has_round = false;
    uint64_t round = 0;
    bool has_layout = false;
    Fingerprint layout_fp{};
    bool has_mask = false;
    Fingerprint mask_fp{};
    bool has_weight_bound = false;
    double weight_bound = 0;
};

class Aggregator {
public:
    // context_fp, the tower moduli and ring_dim come from the server's public context;
    // max_summed is the number of updates the CKKS headroom allows.
    Aggregator(const Fingerprint& context_fp, std::vector<uint64_t> moduli, uint32_t ring_dim,
               uint32_t max_summed, unsigned threads, const RoundExpectations& expect);

    // Validates one serialized update (client update or partial aggregate) and folds it in.
    // Throws InvalidUpdateError / IncompatibleUpdateError / ValueRangeError; on throw the
    // running sum is unchanged.
    void add(const uint8_t* data, size_t len);

    uint32_t count() const { return started_ ? header_.n_summed : 0; }
    bool started() const { return started_; }

    // The running sum as an aggregate update: its size, then its bytes written into out.
    size_t result_size() const;
    void write_result(uint8_t* out) const;

private:
    void check_compatible(const UpdateHeader& h) const;
    // Adds (or subtracts) packed residues [begin, end) into acc_; returns the first index not
    // folded in (== end when every residue was below q).
    uint64_t fold(const uint8_t* payload, uint64_t len, uint64_t begin, uint64_t end,
                  bool subtract);

    Fingerprint context_fp_;
    std::vector<uint64_t> moduli_;
    uint32_t ring_dim_;
    uint32_t max_summed_;
    unsigned threads_;
    RoundExpectations expect_;
    bool started_ = false;
    UpdateHeader header_;
    std::vector<uint64_t> acc_;
    // Seeded updates: every summed update's seed, sorted (the result does not depend on the
    // order of the updates; a seed seen twice is an update summed twice, e.g. a replay).
    std::set<std::array<uint8_t, kSeedSize>> seeds_;
};

}  // namespace fedshield
