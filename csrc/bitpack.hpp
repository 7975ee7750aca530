// Residues mod q are < 2^bits with bits = bit_length(q): storing them in exactly `bits` bits
// (LSB-first) instead of OpenFHE's 64 saves 4 of every 64 bits at q ~ 2^60.
#pragma once
#include <cstddef>
#include <cstdint>

namespace fedshield {

// Bytes needed for `count` residues of `bits` bits each.
inline uint64_t packed_bytes(uint64_t count, unsigned bits) { return (count * bits + 7) / 8; }

// Writes residues[0..count) into out (packed_bytes(count, bits) bytes, trailing bits zero).
void pack_residues(const uint64_t* residues, uint64_t count, unsigned bits, uint8_t* out);

// Reads `count` residues starting at residue index `first` from a packed buffer of `len` bytes.
// `first` must be a multiple of 8 so that it starts on a byte boundary. Bounds are checked by
// the caller (wire.cpp validates payload length before any read).
void unpack_residues(const uint8_t* data, uint64_t len, uint64_t first, uint64_t count,
                     unsigned bits, uint64_t* out);

}  // namespace fedshield
