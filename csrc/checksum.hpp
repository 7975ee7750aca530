// 64-bit non-cryptographic checksum for the wire format: detects corruption at memory speed.
// It is not a MAC: it does not authenticate the sender (see docs/THREAT_MODEL.md).
#pragma once
#include <cstddef>
#include <cstdint>

namespace fedshield {

uint64_t checksum64(const uint8_t* data, size_t len, uint64_t seed = 0);

// The wire format's checksum: checksum64 itself up to kChecksumChunk bytes; above, checksum64
// of the per-chunk checksums (chunk i seeded with i), so it runs on every core.
constexpr size_t kChecksumChunk = size_t(1) << 20;
uint64_t wire_checksum(const uint8_t* data, size_t len, unsigned threads);

}  // namespace fedshield
