// Splits [0, n) into contiguous ranges, one per worker thread; the calling thread takes one.
#pragma once
#include <algorithm>
#include <cctype>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <cstdint>
#include <exception>
#include <thread>
#include <vector>
#ifdef __linux__
#include <sched.h>
#endif

namespace fedshield {

namespace detail {

// A positive integer environment variable, or 0 when unset or not a positive integer.
inline unsigned env_count(const char* name) {
    const char* v = std::getenv(name);
    if (v == nullptr || *v == '\0') return 0;
    char* end = nullptr;
    const unsigned long n = std::strtoul(v, &end, 10);
    while (end != nullptr && std::isspace(static_cast<unsigned char>(*end))) ++end;
    if (end == nullptr || *end != '\0' || n == 0 || n > 1u << 20) return 0;
    return static_cast<unsigned>(n);
}

// CPUs allowed by a cgroup v2 quota (cpu.max), rounded up; 0 when unlimited or unknown.
inline unsigned cgroup_quota() {
    std::FILE* f = std::fopen("/sys/fs/cgroup/cpu.max", "r");
    if (f == nullptr) return 0;
    char quota[32] = {0};
    unsigned long long period = 0;
    const int got = std::fscanf(f, "%31s %llu", quota, &period);
    std::fclose(f);
    if (got != 2 || period == 0 || std::strcmp(quota, "max") == 0) return 0;
    const unsigned long long q = std::strtoull(quota, nullptr, 10);
    return q == 0 ? 0 : static_cast<unsigned>(std::max<unsigned long long>(1, (q + period - 1) / period));
}

}  // namespace detail

// Threads fedshield may use, read afresh on every call (no global state), by the same rule as
// fedshield.base.threads.num_threads: FEDSHIELD_NUM_THREADS when set; otherwise the CPUs of this
// process's affinity mask, capped by a cgroup CPU quota and SLURM_CPUS_PER_TASK, divided
// among torchrun's LOCAL_WORLD_SIZE ranks.
inline unsigned default_threads() {
    if (const unsigned n = detail::env_count("FEDSHIELD_NUM_THREADS")) return n;
    unsigned n = 0;
#ifdef __linux__
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) == 0) n = static_cast<unsigned>(CPU_COUNT(&set));
#endif
    if (n == 0) n = std::max(1u, std::thread::hardware_concurrency());
    if (const unsigned q = detail::cgroup_quota()) n = std::min(n, q);
    if (const unsigned s = detail::env_count("SLURM_CPUS_PER_TASK")) n = std::min(n, s);
    if (const unsigned w = detail::env_count("LOCAL_WORLD_SIZE")) n /= w;
    return std::max(1u, n);
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
