#include "aggregate.hpp"

#include <cstring>
#include <sstream>

#include "bitpack.hpp"
#include "errors.hpp"
#include "modarith.hpp"
#include "parallel.hpp"

namespace fedshield {
namespace {

constexpr uint64_t kBlock = 4096;  // residues per unpack block (multiple of 8: byte aligned)

std::string hex_prefix(const Fingerprint& fp) {
    static const char* digits = "0123456789abcdef";
    std::string s;
    for (int i = 0; i < 6; ++i) {
        s += digits[fp[i] >> 4];
        s += digits[fp[i] & 15];
    }
    return s;
}

std::string number(double x) {  // 64, not 64.000000
    std::ostringstream out;
    out << x;
    return out.str();
}

[[noreturn]] void incompatible(const std::string& what) {
    throw IncompatibleUpdateError("incompatible update: " + what);
}

}  // namespace

Aggregator::Aggregator(const Fingerprint& context_fp, std::vector<uint64_t> moduli,
                       uint32_t ring_dim, uint32_t max_summed, unsigned threads,
                       const RoundExpectations& expect)
    : context_fp_(context_fp),
      moduli_(std::move(moduli)),
      ring_dim_(ring_dim),
      max_summed_(max_summed),
      // More threads than cores only costs memory (per-thread state is sized by it).
      threads_(std::min(threads ? threads : default_threads(), 4 * default_threads())),
      expect_(expect) {}

void Aggregator::check_compatible(const UpdateHeader& h) const {
    if (h.context_fp != context_fp_)
        incompatible("made under context " + hex_prefix(h.context_fp) +
                     "..., the server's context is " + hex_prefix(context_fp_) + "...");
    if (h.moduli != moduli_ || h.ring_dim != ring_dim_)
        incompatible("ring_dim/modulus (RNS towers) differ from the server's context");
    if (h.packing != expect_.packing)
        incompatible("packing " + std::to_string(static_cast<unsigned>(h.packing)) +
                     " differs from the server's parameters (" +
                     std::to_string(static_cast<unsigned>(expect_.packing)) + ")");
    if (h.elements != expect_.elements)
        incompatible(std::string(h.seeded() ? "a seeded update (c0 and a seed)"
                                            : "an update with both polynomials") +
                     ", the server's parameters expect " +
                     (expect_.elements == 1 ? "seeded updates" : "both polynomials"));
    if (h.kind == UpdateKind::Aggregate && !expect_.allow_aggregates)
        incompatible("an aggregate (n_summed " + std::to_string(h.n_summed) +
                     ") where client updates are expected");
    if (expect_.has_round && h.round != expect_.round)
        incompatible("round " + std::to_string(h.round) + ", the server is aggregating round " +
                     std::to_string(expect_.round));
    if (expect_.has_layout && h.layout_fp != expect_.layout_fp)
        incompatible("layout " + hex_prefix(h.layout_fp) + "... is not the round's " +
                     hex_prefix(expect_.layout_fp) + "...");
    if (expect_.has_mask && h.mask_fp != expect_.mask_fp)
        incompatible("mask " + hex_prefix(h.mask_fp) + "... is not the round's " +
                     hex_prefix(expect_.mask_fp) + "...");
    if (expect_.has_weight_bound && h.weight_bound != expect_.weight_bound)
        incompatible("weight_bound " + std::to_string(h.weight_bound) + " is not the round's " +
                     std::to_string(expect_.weight_bound));
    if (!started_) return;
    if (h.layout_fp != header_.layout_fp)
        incompatible("layout " + hex_prefix(h.layout_fp) + "... differs from the round's " +
                     hex_prefix(header_.layout_fp) + "...");
    if (h.mask_fp != header_.mask_fp)
        incompatible("mask " + hex_prefix(h.mask_fp) + "... differs from the round's " +
                     hex_prefix(header_.mask_fp) +
                     "... (slot-wise addition needs one mask for every client)");
    if (h.round != header_.round)
        incompatible("round " + std::to_string(h.round) + " differs from the round being " +
                     "aggregated (" + std::to_string(header_.round) + ")");
    if (h.n_values != header_.n_values || h.n_ciphertexts != header_.n_ciphertexts ||
        h.packing != header_.packing)
        incompatible("shape (values/ciphertexts/packing) differs from the round's");
    // Each update's weights are pre-divided by its bound, and no exact operation on a
    // ciphertext mod a prime divides by a power of two, so one aggregate needs one bound.
    if (h.weight_bound != header_.weight_bound)
        incompatible("weight_bound " + number(h.weight_bound) + " differs from " +
                     number(header_.weight_bound) +
                     ": the updates of one aggregate share one weight bound; encrypt every "
                     "update of the round with weight_bound= the round's (at least its largest "
                     "weight, e.g. the next power of two of it, as fedshield's Server sends)");
}

uint64_t Aggregator::fold(const uint8_t* payload, uint64_t len, uint64_t begin, uint64_t end,
                          bool subtract) {
    std::vector<uint64_t> block(kBlock);
    const uint64_t n_ring = header_.ring_dim;
    for (uint64_t at = begin; at < end; at += kBlock) {
        const uint64_t n = std::min(kBlock, end - at);
        // Residues run in blocks of ring_dim per tower, each tower at its own width: a block of
        // kBlock may cross towers when ring_dim < kBlock, so each run inside one tower is
        // unpacked, checked below that tower's modulus and added on its own. kBlock and
        // ring_dim are powers of two, so every run starts on a byte.
        for (uint64_t s = 0; s < n;) {
            const uint64_t r = at + s;
            const uint64_t run = std::min(n - s, n_ring - r % n_ring);
            const uint64_t off = header_.byte_offset(r);
            unpack_residues(payload + off, len - off, 0, run, header_.bits_of(r),
                            block.data() + s);
            if (any_not_below(block.data() + s, run, header_.modulus_of(r))) return at;
            s += run;
        }
        for (uint64_t s = 0; s < n;) {
            const uint64_t r = at + s;
            const uint64_t run = std::min(n - s, n_ring - r % n_ring);
            const uint64_t q = header_.modulus_of(r);
            if (subtract) sub_mod(acc_.data() + r, block.data() + s, run, q);
            else add_mod(acc_.data() + r, block.data() + s, run, q);
            s += run;
        }
    }
    return end;
}

void Aggregator::add(const uint8_t* data, size_t len) {
    UpdateHeader h = parse_update(data, len, threads_);
    check_compatible(h);
    if (started_ && static_cast<uint64_t>(header_.n_summed) + h.n_summed > max_summed_)
        throw ValueRangeError("aggregate: " +
                              std::to_string(static_cast<uint64_t>(header_.n_summed) +
                                             h.n_summed) +
                              " updates exceed the CKKS headroom of these parameters (max_clients " +
                              std::to_string(max_summed_) + "); sums beyond it would wrap mod q");
    if (!started_ && h.n_summed > max_summed_)
        throw ValueRangeError("aggregate: an update already sums " + std::to_string(h.n_summed) +
                              " clients, more than max_clients " + std::to_string(max_summed_));
    const uint8_t* payload = data + h.header_size();
    const uint8_t* seeds = payload + h.payload_len;
    std::vector<std::array<uint8_t, kSeedSize>> new_seeds(h.seeded() ? h.n_summed : 0);
    for (size_t i = 0; i < new_seeds.size(); ++i) {
        std::memcpy(new_seeds[i].data(), seeds + i * kSeedSize, kSeedSize);
        if (seeds_.count(new_seeds[i]))
            throw InvalidUpdateError("invalid update: its seed is already in the sum (the same "
                                     "update twice, or a replay)");
    }
    const uint64_t total = h.total_residues();
    const bool first = !started_;
    if (first) {
        header_ = h;
        acc_.assign(total, 0);
    }
    std::vector<uint64_t> stop(threads_, 0), start(threads_, 0);
    std::vector<char> failed(threads_, 0);
    std::exception_ptr error;
    try {
        parallel_ranges(total, threads_, kBlock, [&](unsigned w, uint64_t begin, uint64_t end) {
            start[w] = stop[w] = begin;  // fold only throws before adding anything
            stop[w] = fold(payload, h.payload_len, begin, end, false);
            failed[w] = stop[w] != end;
        });
    } catch (...) {
        error = std::current_exception();  // e.g. bad_alloc: undo what was added, then rethrow
    }
    bool any_failed = error != nullptr;
    for (char f : failed) any_failed |= f != 0;
    if (any_failed) {
        if (first) {
            acc_.clear();
            acc_.shrink_to_fit();
        } else {
            // Undo exactly what was folded in: subtraction mod q is the inverse of addition.
            parallel_ranges(threads_, threads_, 1, [&](unsigned, uint64_t b, uint64_t e) {
                for (uint64_t w = b; w < e; ++w)
                    if (stop[w] > start[w]) fold(payload, h.payload_len, start[w], stop[w], true);
            });
        }
        if (error) std::rethrow_exception(error);
        throw InvalidUpdateError("invalid update: a residue is not below the modulus");
    }
    if (first) {
        started_ = true;
    } else {
        header_.n_summed += h.n_summed;
    }
    for (const auto& s : new_seeds) seeds_.insert(s);
}

static UpdateHeader aggregate_header(const UpdateHeader& running) {
    UpdateHeader h = running;
    h.kind = UpdateKind::Aggregate;
    return h;
}

size_t Aggregator::result_size() const {
    if (!started_) throw IncompatibleUpdateError("aggregate: no update was added");
    return update_size(header_);
}

void Aggregator::write_result(uint8_t* out) const {
    if (!started_) throw IncompatibleUpdateError("aggregate: no update was added");
    const UpdateHeader h = aggregate_header(header_);
    uint8_t* payload = out + h.header_size();
    // Ranges aligned to kBlock residues start and end on byte boundaries: threads never share
    // a byte, so each packs straight into the output.
    parallel_ranges(h.total_residues(), threads_, kBlock,
                    [&](unsigned, uint64_t begin, uint64_t end) {
        for (uint64_t r = begin; r < end;) {  // runs inside one tower (own width)
            const uint64_t run = std::min(end - r, h.ring_dim - r % h.ring_dim);
            pack_residues(acc_.data() + r, run, h.bits_of(r), payload + h.byte_offset(r));
            r += run;
        }
    });
    uint8_t* seeds = payload + h.payload_len;
    for (const auto& s : seeds_) {
        std::memcpy(seeds, s.data(), kSeedSize);
        seeds += kSeedSize;
    }
    seal_update(h, out, threads_);
}

}  // namespace fedshield
