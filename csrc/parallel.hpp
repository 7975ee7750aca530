// Splits [0, n) into contiguous ranges, one per worker thread; the calling thread takes one.
#pragma once
#include <algorithm>
#include <cstdint>
#include <exception>
#include <system_error>
#include <thread>
#include <vector>

namespace fedshield {

inline unsigned default_threads() {
    unsigned n = std::thread::hardware_concurrency();
    return n == 0 ? 1 : n;
}

// Calls fn(worker, begin, end) on up to `threads` ranges whose bounds are multiples of `align`.
// The first exception thrown by any worker is rethrown after all have joined.
template <class F>
void parallel_ranges(uint64_t n, unsigned threads, uint64_t align, F fn) {
    if (threads < 1) threads = 1;
    uint64_t per = (n + threads - 1) / threads;
    per = (per + align - 1) / align * align;
    if (per == 0) per = align;
    std::vector<std::thread> pool;
    std::vector<std::exception_ptr> errors(threads);
    unsigned used = 0;
    for (uint64_t begin = 0; begin < n; begin += per, ++used) {
        const uint64_t end = std::min(n, begin + per);
        const unsigned w = used;
        auto run = [&, w, begin, end] {
            try {
                fn(w, begin, end);
            } catch (...) {
                errors[w] = std::current_exception();
            }
        };
        if (end < n) {
            try {
                pool.emplace_back(run);
            } catch (const std::system_error&) {
                run();  // no thread to be had (EAGAIN): do this range here
            }
        } else {
            run();  // last range on the calling thread
        }
    }
    for (auto& t : pool) t.join();
    for (auto& e : errors)
        if (e) std::rethrow_exception(e);
}

}  // namespace fedshield
