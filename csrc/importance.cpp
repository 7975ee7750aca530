// Per-segment k-th smallest score by radix select over the float bits, then mask + compaction.
//
// A score is non-negative, so its bit pattern (sign cleared) orders like the float. Pass 0
// histograms bits 30..20 of every value (and checks that the inputs are finite); each later pass
// either histograms the next 10 bits of the values still in the selected range, or, once that
// range holds few enough values, gathers them and finishes with nth_element. The mask pass then
// prunes every score below the threshold and the first `equal_pruned` scores equal to it.
//
// Segments that fit one chunk run start to finish on one thread (their data stays in cache);
// larger segments (global scope) run pass by pass with the chunks spread over the threads.
#include "importance.hpp"
#include "parallel.hpp"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <exception>
#include <limits>
#include <thread>

namespace fedshield {
namespace {

constexpr uint64_t kChunk = uint64_t(1) << 18;
constexpr uint64_t kNone = std::numeric_limits<uint64_t>::max();
constexpr uint32_t kKeyEnd = uint32_t(1) << 31;  // one past the largest key

inline uint32_t bits_of(float f) {
    uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    return u;
}

inline bool finite_bits(uint32_t u) { return (u & 0x7F800000u) != 0x7F800000u; }

template <Criterion C>
inline uint32_t key_at(const float* x, const float* y, uint64_t i) {
    if constexpr (C == Criterion::L1) {
        return bits_of(x[i]) & 0x7FFFFFFFu;
    } else if constexpr (C == Criterion::Delta) {
        return bits_of(x[i] - y[i]) & 0x7FFFFFFFu;
    } else {
        return bits_of(x[i] * y[i]) & 0x7FFFFFFFu;
    }
}

// Runs fn(i) for i in [0, n) on up to `threads` threads, handing out items one at a time.
template <class F>
void parallel_for(size_t n, unsigned threads, F fn) {
    if (n == 0) return;
    const unsigned workers = static_cast<unsigned>(std::min<size_t>(std::max(threads, 1u), n));
    std::atomic<size_t> next{0};
    std::vector<std::exception_ptr> errors(workers);
    auto work = [&](unsigned w) {
        try {
            for (size_t i; (i = next.fetch_add(1)) < n;) fn(i);
        } catch (...) {
            errors[w] = std::current_exception();
            next = n;
        }
    };
    std::vector<std::thread> pool;
    for (unsigned w = 1; w < workers; ++w) pool.emplace_back(work, w);
    work(0);
    for (auto& t : pool) t.join();
    for (auto& e : errors)
        if (e) std::rethrow_exception(e);
}

enum class Mode { Histogram, Gather, Done };

struct Chunk {
    const float* x;
    const float* y;
    uint32_t tensor;
    uint32_t segment;
    uint64_t begin, end;  // local range in the tensor
    uint64_t flat;        // flat index of `begin`
    std::vector<uint32_t> hist;
    std::vector<uint32_t> candidates;
    uint64_t below = 0;   // keys under the segment's current range
    uint64_t in_range = 0;  // keys inside it (from the last histogram)
    uint64_t less = 0, equal = 0;                  // vs the threshold
    uint64_t less_before = 0, equal_before = 0;    // in the segment's earlier chunks
    uint64_t bad = kNone;                          // first non-finite local index
    bool bad_in_other = false;
};

struct Segment {
    uint64_t k = 0;
    uint64_t pruned_before = 0;  // pruned values in earlier segments
    size_t first = 0, last = 0;  // its chunks [first, last)
    uint64_t size = 0;
    Mode mode = Mode::Histogram;
    unsigned shift = 20;         // of the digit the next histogram pass counts
    uint32_t lo = 0, hi = kKeyEnd;  // the range of keys that still holds the k-th one
    uint64_t k_rem = 0;          // its 1-based rank inside [lo, hi)
    uint32_t threshold = 0;
    uint64_t equal_pruned = 0;
};

template <Criterion C>
class Selector {
public:
    Selector(std::vector<Chunk>& chunks, std::vector<Segment>& segments)
        : chunks_(chunks), segments_(segments) {}

    // One pass over a chunk in its segment's current mode.
    void pass(Chunk& c) {
        Segment& s = segments_[c.segment];
        const float* x = c.x;
        const float* y = c.y;
        if (s.mode == Mode::Histogram && s.shift == 20) {  // pass 0: all keys, finiteness
            // Two interleaved histograms: neighbours often share a bin, and one histogram
            // would serialize on that counter.
            c.hist.assign(2 * 2048, 0);
            uint32_t* h0 = c.hist.data();
            uint32_t* h1 = h0 + 2048;
            bool finite = true;
            uint64_t i = c.begin;
            for (; i + 1 < c.end; i += 2) {
                const uint32_t k0 = key_at<C>(x, y, i), k1 = key_at<C>(x, y, i + 1);
                ++h0[k0 >> 20];
                ++h1[k1 >> 20];
                if constexpr (C == Criterion::L1) {
                    finite &= (k0 < 0x7F800000u) & (k1 < 0x7F800000u);
                } else {
                    finite &= finite_bits(bits_of(x[i])) & finite_bits(bits_of(y[i])) &
                              finite_bits(bits_of(x[i + 1])) & finite_bits(bits_of(y[i + 1]));
                }
            }
            for (; i < c.end; ++i) {
                const uint32_t key = key_at<C>(x, y, i);
                ++h0[key >> 20];
                if constexpr (C == Criterion::L1) finite &= key < 0x7F800000u;
                else finite &= finite_bits(bits_of(x[i])) & finite_bits(bits_of(y[i]));
            }
            for (size_t b = 0; b < 2048; ++b) h0[b] += h1[b];
            if (!finite) {  // rare: find the first bad value for the message
                for (uint64_t i = c.begin; i < c.end && c.bad == kNone; ++i) {
                    const bool x_ok = finite_bits(bits_of(x[i]));
                    if (!x_ok || (C != Criterion::L1 && !finite_bits(bits_of(y[i])))) {
                        c.bad = i;
                        c.bad_in_other = x_ok;
                    }
                }
            }
            return;
        }
        // Branch-free: whether a key is below or inside [lo, hi) is a coin flip near the median.
        const uint32_t lo = s.lo, width = s.hi - s.lo;
        uint64_t below = 0;
        if (s.mode == Mode::Histogram) {
            c.hist.assign(1025, 0);  // the last bin takes the keys outside the range
            uint32_t* h = c.hist.data();
            const unsigned shift = s.shift;
            for (uint64_t i = c.begin; i < c.end; ++i) {
                const uint32_t key = key_at<C>(x, y, i);
                below += key < lo;
                ++h[key - lo < width ? ((key >> shift) & 1023u) : 1024u];
            }
        } else {
            c.candidates.resize(c.in_range + 1);  // one slot of slack for the last write
            uint32_t* out = c.candidates.data();
            uint64_t n = 0;
            for (uint64_t i = c.begin; i < c.end; ++i) {
                const uint32_t key = key_at<C>(x, y, i);
                below += key < lo;
                out[n] = key;
                n += key - lo < width;
            }
            c.candidates.resize(n);
        }
        c.below = below;
    }

    // Combines the chunks' results of the last pass; sets the segment's next mode.
    void advance(Segment& s) {
        if (s.mode == Mode::Gather) {
            finish_gather(s);
            return;
        }
        const size_t bins = s.shift == 20 ? 2048 : 1024;
        if (s.shift == 20) {
            s.k_rem = s.k;
            if (s.k == 0) {
                s.mode = Mode::Done;
                return;
            }
        }
        std::vector<uint64_t> total(bins, 0);
        for (size_t ci = s.first; ci < s.last; ++ci)
            for (size_t b = 0; b < bins; ++b) total[b] += chunks_[ci].hist[b];
        size_t digit = 0;
        while (total[digit] < s.k_rem) s.k_rem -= total[digit++];
        s.lo += static_cast<uint32_t>(digit) << s.shift;
        s.hi = s.lo + (uint32_t(1) << s.shift);
        if (s.shift == 0) {  // the threshold is exact: the chunks' counts are in the histogram
            s.threshold = s.lo;
            uint64_t less = 0;
            for (size_t ci = s.first; ci < s.last; ++ci) {
                Chunk& c = chunks_[ci];
                c.less = c.below;
                for (size_t b = 0; b < digit; ++b) c.less += c.hist[b];
                c.equal = c.hist[digit];
                less += c.less;
            }
            s.equal_pruned = s.k - less;
            s.mode = Mode::Done;
            return;
        }
        // Few enough values left in range: gather them rather than pass over the data again.
        s.mode = total[digit] <= s.size / 8 + 1024 ? Mode::Gather : Mode::Histogram;
        for (size_t ci = s.first; ci < s.last; ++ci)
            chunks_[ci].in_range = chunks_[ci].hist[digit];
        s.shift = s.shift == 20 ? 10 : 0;
    }

    // Exclusive in-segment counts of the earlier chunks, for ties and compaction offsets.
    void offsets(Segment& s) {
        uint64_t less = 0, equal = 0;
        for (size_t ci = s.first; ci < s.last; ++ci) {
            Chunk& c = chunks_[ci];
            c.less_before = less;
            c.equal_before = equal;
            less += c.less;
            equal += c.equal;
        }
    }

    void mask(Chunk& c, const ImportanceOutputs& out) {
        const Segment& s = segments_[c.segment];
        const float* x = c.x;
        const float* y = c.y;
        uint8_t* m = out.mask + c.flat - c.begin;
        const bool compact = out.kept_values != nullptr;
        uint64_t pos = c.flat - s.pruned_before - c.less_before -
                       std::min(c.equal_before, s.equal_pruned);
        if (s.k == 0) {
            std::memset(m + c.begin, 1, c.end - c.begin);
            if (compact) {
                std::memcpy(out.kept_values + pos, x + c.begin, (c.end - c.begin) * sizeof(float));
                for (uint64_t i = c.begin; i < c.end; ++i)
                    out.kept_indices[pos++] = static_cast<int64_t>(c.flat - c.begin + i);
            }
            return;
        }
        const uint32_t t = s.threshold;
        uint64_t equal_seen = c.equal_before;
        const uint64_t equal_pruned = s.equal_pruned;
        if (!compact) {
            // Usually every tie in the chunk is pruned, or none is: one comparison, vectorized.
            if (equal_seen >= equal_pruned) {
                for (uint64_t i = c.begin; i < c.end; ++i) m[i] = key_at<C>(x, y, i) >= t;
                return;
            }
            if (equal_seen + c.equal <= equal_pruned) {
                for (uint64_t i = c.begin; i < c.end; ++i) m[i] = key_at<C>(x, y, i) > t;
                return;
            }
            for (uint64_t i = c.begin; i < c.end; ++i) {
                const uint32_t key = key_at<C>(x, y, i);
                const bool equal = key == t;
                m[i] = (key > t) | (equal & (equal_seen >= equal_pruned));
                equal_seen += equal;
            }
            return;
        }
        // Compaction: branch-free writes into a small local buffer, copied out per block.
        constexpr uint64_t kBlock = 1024;
        float vals[kBlock + 1];
        int64_t idxs[kBlock + 1];
        const int64_t base = static_cast<int64_t>(c.flat - c.begin);
        for (uint64_t b = c.begin; b < c.end; b += kBlock) {
            const uint64_t e = std::min(c.end, b + kBlock);
            uint64_t n = 0;
            for (uint64_t i = b; i < e; ++i) {
                const uint32_t key = key_at<C>(x, y, i);
                const bool equal = key == t;
                const bool keep = (key > t) | (equal & (equal_seen >= equal_pruned));
                equal_seen += equal;
                m[i] = keep;
                vals[n] = x[i];
                idxs[n] = base + static_cast<int64_t>(i);
                n += keep;
            }
            std::memcpy(out.kept_values + pos, vals, n * sizeof(float));
            std::memcpy(out.kept_indices + pos, idxs, n * sizeof(int64_t));
            pos += n;
        }
    }

private:
    void finish_gather(Segment& s) {
        std::vector<uint32_t> joined;
        std::vector<uint32_t>* all = &chunks_[s.first].candidates;
        if (s.last - s.first > 1) {
            for (size_t ci = s.first; ci < s.last; ++ci)
                joined.insert(joined.end(), chunks_[ci].candidates.begin(),
                              chunks_[ci].candidates.end());
            all = &joined;
        }
        auto nth = all->begin() + static_cast<std::ptrdiff_t>(s.k_rem - 1);
        std::nth_element(all->begin(), nth, all->end());
        s.threshold = *nth;
        uint64_t less = 0;
        for (size_t ci = s.first; ci < s.last; ++ci) {  // counting ignores the order
            Chunk& c = chunks_[ci];
            c.less = c.below;
            c.equal = 0;
            for (uint32_t key : c.candidates) {
                c.less += key < s.threshold;
                c.equal += key == s.threshold;
            }
            less += c.less;
            std::vector<uint32_t>().swap(c.candidates);
        }
        s.equal_pruned = s.k - less;
        s.mode = Mode::Done;
    }

    std::vector<Chunk>& chunks_;
    std::vector<Segment>& segments_;
};

// No iostreams here: formatting a number through std::ostringstream segfaulted inside this
// module on a GCC 13 / Python 3.12 host with torch loaded (a libstdc++ mix-up in the process).
std::string describe_bad(const Chunk& c, const std::vector<std::string>& names,
                         const std::string& other_label) {
    const float v = c.bad_in_other ? c.y[c.bad] : c.x[c.bad];
    const std::string tensor =
        c.tensor < names.size() ? "'" + names[c.tensor] + "'" : std::to_string(c.tensor);
    return (c.bad_in_other ? other_label : std::string("state")) + "[" + tensor +
           "] contains NaN or Inf (" + (std::isnan(v) ? "nan" : v > 0 ? "inf" : "-inf") +
           " at index " + std::to_string(c.bad) + " of the flattened tensor)";
}

template <Criterion C>
void run(std::vector<Chunk>& chunks, std::vector<Segment>& segments,
         const ImportanceOutputs& out, unsigned threads) {
    Selector<C> sel(chunks, segments);
    std::vector<size_t> small, large;
    for (size_t si = 0; si < segments.size(); ++si)
        (segments[si].last - segments[si].first == 1 ? small : large).push_back(si);

    // One-chunk segments: every pass on one thread while the data is in cache.
    parallel_for(small.size(), threads, [&](size_t i) {
        Segment& s = segments[small[i]];
        Chunk& c = chunks[s.first];
        while (s.mode != Mode::Done) {
            sel.pass(c);
            if (c.bad != kNone) return;
            sel.advance(s);
        }
        sel.offsets(s);
        sel.mask(c, out);
    });

    // Multi-chunk segments: pass by pass, chunks spread over the threads.
    std::vector<size_t> work;
    for (;;) {
        work.clear();
        for (size_t si : large)
            if (segments[si].mode != Mode::Done)
                for (size_t ci = segments[si].first; ci < segments[si].last; ++ci)
                    work.push_back(ci);
        if (work.empty()) break;
        parallel_for(work.size(), threads, [&](size_t i) { sel.pass(chunks[work[i]]); });
        for (size_t ci : work)
            if (chunks[ci].bad != kNone) return;
        for (size_t si : large)
            if (segments[si].mode != Mode::Done) sel.advance(segments[si]);
    }
    work.clear();
    for (size_t si : large) {
        sel.offsets(segments[si]);
        for (size_t ci = segments[si].first; ci < segments[si].last; ++ci) work.push_back(ci);
    }
    parallel_for(work.size(), threads, [&](size_t i) { sel.mask(chunks[work[i]], out); });
}

}  // namespace

void importance_mask(const std::vector<ImportanceTensor>& tensors, Criterion criterion,
                     const std::vector<uint64_t>& n_prune, bool global_scope,
                     const ImportanceOutputs& out, unsigned threads,
                     const std::vector<std::string>& names, const std::string& other_label) {
    if (tensors.empty()) throw ImportanceInputError("importance_mask: no tensors");
    const size_t n_segments = global_scope ? 1 : tensors.size();
    if (n_prune.size() != n_segments)
        throw ImportanceInputError("importance_mask: expected " + std::to_string(n_segments) +
                                   " prune counts, got " + std::to_string(n_prune.size()));
    if (out.mask == nullptr || (out.kept_values == nullptr) != (out.kept_indices == nullptr))
        throw ImportanceInputError("importance_mask: bad output buffers");
    const bool needs_other = criterion != Criterion::L1;

    std::vector<Segment> segments(n_segments);
    std::vector<Chunk> chunks;
    uint64_t flat = 0;
    for (size_t ti = 0; ti < tensors.size(); ++ti) {
        const ImportanceTensor& t = tensors[ti];
        const std::string label = ti < names.size() ? "'" + names[ti] + "'" : std::to_string(ti);
        if (t.numel == 0) throw ImportanceInputError("state[" + label + "] is empty");
        if (t.values == nullptr || (t.other == nullptr) == needs_other)
            throw ImportanceInputError("importance_mask: tensor " + label +
                                       (needs_other ? " needs " : " takes no ") + other_label);
        const size_t si = global_scope ? 0 : ti;
        if (!global_scope || ti == 0) segments[si].first = chunks.size();
        for (uint64_t b = 0; b < t.numel; b += kChunk) {
            Chunk c;
            c.x = t.values;
            c.y = t.other;
            c.tensor = static_cast<uint32_t>(ti);
            c.segment = static_cast<uint32_t>(si);
            c.begin = b;
            c.end = std::min(t.numel, b + kChunk);
            c.flat = flat + b;
            chunks.push_back(std::move(c));
        }
        segments[si].last = chunks.size();
        segments[si].size += t.numel;
        flat += t.numel;
    }
    uint64_t pruned = 0;
    for (size_t si = 0; si < n_segments; ++si) {
        Segment& s = segments[si];
        if (n_prune[si] > s.size)
            throw ImportanceInputError("importance_mask: cannot prune " +
                                       std::to_string(n_prune[si]) + " of " +
                                       std::to_string(s.size) + " values");
        s.k = n_prune[si];
        s.pruned_before = pruned;
        pruned += s.k;
    }
    if (threads == 0) threads = default_threads();

    switch (criterion) {
        case Criterion::L1: run<Criterion::L1>(chunks, segments, out, threads); break;
        case Criterion::Delta: run<Criterion::Delta>(chunks, segments, out, threads); break;
        case Criterion::Taylor: run<Criterion::Taylor>(chunks, segments, out, threads); break;
        default: throw ImportanceInputError("importance_mask: unknown criterion");
    }
    for (const Chunk& c : chunks)
        if (c.bad != kNone) throw ImportanceInputError(describe_bad(c, names, other_label));
}

}  // namespace fedshield
