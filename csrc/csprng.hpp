// The one source of randomness of the native core: the kernel CSPRNG (getrandom(2)).
#pragma once
#include <cstddef>
#include <cstdint>

namespace fedshield {

// Fills out with bytes from the kernel CSPRNG; never a weaker source (throws on failure).
void random_bytes(uint8_t* out, size_t len);

}  // namespace fedshield
