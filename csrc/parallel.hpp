// Splits [0, n) into contiguous ranges, one per worker thread; the calling thread takes one.
#pragma once
#include <algorithm>
#include <cstdint>
#include <exception>
#include <thread>
#include <vector>

namespace fedshield {

inline unsigned default_threads() {
    unsigned n = std::thread::hardware_concurrency();
    return n == 0 ? 1 : n;
}

// Calls fn(worker, begin, end) on up to `threads` ranges whose bounds are multiples of `align`.
// The first exception thrown by any worker is rethrown after all have joined. A range whose
// thread cannot be started (no thread or memory to be had: std::system_error, bad_alloc) runs
// on the calling thread instead: never std::terminate from a joinable thread left behind.
template <class F>
void parallel_ranges(uint64_t n, unsigned threads, uint64_t align, F fn) {
    if (threads < 1) threads = 1;
    uint64_t per = (n + threads - 1) / threads;
    per = (per + align - 1) / align * align;
    if (per == 0) per = align;
    std::vector<std::exception_ptr> errors(threads);
    std::vector<std::thread> pool;
    // Joins whatever was started on every way out, an exception between two starts included.
    struct JoinAll {
        std::vector<std::thread>& pool;
        ~JoinAll() {
            for (auto& t : pool)
                if (t.joinable()) t.join();
        }
    } join_all{pool};
    try {
        pool.reserve(threads);  // emplace_back below then never reallocates
    } catch (...) {
        threads = 1;  // not even that memory: one range, on this thread
        per = std::max<uint64_t>(n, align);
    }
    unsigned used = 0;
    for (uint64_t begin = 0; begin < n; begin += per, ++used) {
        const uint64_t end = std::min(n, begin + per);
        const unsigned w = used;
        auto run = [&, w, begin, end]() noexcept {
            try {
                fn(w, begin, end);
            } catch (...) {
                errors[w] = std::current_exception();
            }
        };
        bool started = false;
        if (end < n && pool.size() < pool.capacity()) {
            try {
                pool.emplace_back(run);
                started = true;
            } catch (...) {  // EAGAIN, ENOMEM: this range runs here
            }
        }
        if (!started) run();
    }
    for (auto& t : pool) t.join();
    for (auto& e : errors)
        if (e) std::rethrow_exception(e);
}

}  // namespace fedshield
