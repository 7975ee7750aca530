// 64-bit non-cryptographic checksum for the wire format: detects corruption at memory speed.
// It is not a MAC: it does not authenticate the sender (see docs/THREAT_MODEL.md).
#pragma once
#include <cstddef>
#include <cstdint>

namespace fedshield {

uint64_t checksum64(const uint8_t* data, size_t len, uint64_t seed = 0);

}  // namespace fedshield
