#include "csprng.hpp"

#include <sys/random.h>

#include <cerrno>
#include <cstring>
#include <stdexcept>
#include <string>

namespace fedshield {

// Fills out with bytes from the kernel CSPRNG; never falls back to a weaker source.
void random_bytes(uint8_t* out, size_t len) {
    while (len > 0) {
        const ssize_t got = getrandom(out, len, 0);
        if (got < 0) {
            if (errno == EINTR) continue;
            throw std::runtime_error(std::string("getrandom failed: ") + std::strerror(errno));
        }
        out += got;
        len -= static_cast<size_t>(got);
    }
}

}  // namespace fedshield
