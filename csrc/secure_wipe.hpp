// Wiping secrets (key residues, Shamir coefficients, flooding noise before it is added) so the
// compiler cannot drop the stores: a memset right before a buffer is freed is dead code to the
// optimizer, explicit_bzero is not.
#pragma once
#include <string.h>

#include <cstddef>
#include <vector>

namespace fedshield {

inline void secure_wipe(void* data, size_t len) {
    if (len == 0) return;
#if defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 25))
    explicit_bzero(data, len);
#else
    volatile unsigned char* p = static_cast<volatile unsigned char*>(data);
    while (len--) *p++ = 0;
#endif
}

template <class T>
void secure_wipe(std::vector<T>& v) {
    secure_wipe(v.data(), v.size() * sizeof(T));
}

template <class T>
void secure_wipe(std::vector<std::vector<T>>& vs) {
    for (auto& v : vs) secure_wipe(v);
}

// Wipes a vector when the scope ends, on every path (an exception half-way included).
template <class T>
class WipeOnExit {
public:
    explicit WipeOnExit(std::vector<T>& v) : v_(v) {}
    ~WipeOnExit() { secure_wipe(v_); }
    WipeOnExit(const WipeOnExit&) = delete;
    WipeOnExit& operator=(const WipeOnExit&) = delete;

private:
    std::vector<T>& v_;
};

}  // namespace fedshield
