// The fedshield update wire format (version 3), little-endian:
//
//   off  size  field
//     0     8  magic "FSHLDUPD"
//     8     2  version (3; version 2 is read as well, see below)
//    10     2  kind (1 = one client's update, 2 = an aggregate)
//    12     4  n_summed: client updates folded in (1 for a client update)
//    16    32  context fingerprint
//    48    32  layout fingerprint
//    80    32  mask fingerprint (all zero = dense, no mask)
//   112     8  round
//   120     8  n_values: real values packed (kept LoRA values + 1 weight)
//   128     4  ring_dim N
//   132     4  n_ciphertexts
//   136     8  modulus q_0 of RNS tower 0
//   144     1  residue_bits = max over the towers of bit_length(q_i)
//   145     1  packing (1 = complex: 2 reals per slot, 2 = real: 1 per slot)
//   146     1  n_towers T (1..8)
//   147     1  elements E per ciphertext on the wire: 2 = c0 and c1 (public-key encryption),
//              1 = c0 only (seeded: c1 is expanded from the seeds, see seeded.hpp)
//   148     4  reserved, zero
//   152     8  weight_bound (float64)
//   160     8  payload_len
//   168  8(T-1) moduli q_1 .. q_{T-1} of the other towers (nothing when T = 1)
//   H       -  payload, H = 168 + 8(T-1): n_ciphertexts * E * T * N residues (per ciphertext
//              c0 tower 0..T-1, then, when E = 2, c1 tower 0..T-1; tower i's residues below
//              q_i), tower i's bit-packed to bit_length(q_i) bits (each run of N starts on a
//              byte)
//   H+P  32n   seeds, E = 1 only: the 32-byte seed of each of the n_summed client updates
//              summed in (their c1 is the sum of their expansions), distinct
//   end-8   8  checksum64 of every byte before it
//
// Version 2 was the same with E = 2 always and byte 147 reserved (zero): it is read as E = 2.
// Version 1 (one tower, byte 146 reserved) is refused with its version named.
#pragma once
#include <array>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace fedshield {

constexpr size_t kHeaderSize = 168;  // the fixed part; header_size() adds the extra moduli
constexpr size_t kChecksumSize = 8;
constexpr size_t kSeedSize = 32;
constexpr uint16_t kWireVersion = 3;

enum class UpdateKind : uint16_t { Client = 1, Aggregate = 2 };
enum class Packing : uint8_t { Complex = 1, Real = 2 };

using Fingerprint = std::array<uint8_t, 32>;

// Smallest number of bits that holds q - 1 (and q itself).
unsigned bit_length(uint64_t q);

struct UpdateHeader {
    UpdateKind kind = UpdateKind::Client;
    uint32_t n_summed = 1;
    Fingerprint context_fp{};
    Fingerprint layout_fp{};
    Fingerprint mask_fp{};
    uint64_t round = 0;
    uint64_t n_values = 0;
    uint32_t ring_dim = 0;
    uint32_t n_ciphertexts = 0;
    std::vector<uint64_t> moduli;  // one per RNS tower (1..8)
    uint8_t residue_bits = 0;
    Packing packing = Packing::Complex;
    uint8_t elements = 2;          // polynomials per ciphertext on the wire (1: seeded)
    double weight_bound = 1.0;
    uint64_t payload_len = 0;

    uint64_t towers() const { return moduli.size(); }
    bool seeded() const { return elements == 1; }
    // Seed bytes after the payload: one seed per client update summed in (seeded only).
    uint64_t seeds_len() const { return seeded() ? kSeedSize * n_summed : 0; }
    uint64_t residues_per_ciphertext() const { return uint64_t{elements} * ring_dim * moduli.size(); }
    // The modulus of residue index r (residues run in blocks of ring_dim per tower).
    uint64_t modulus_of(uint64_t r) const { return moduli[(r / ring_dim) % moduli.size()]; }
    // Bits each residue of residue index r takes on the wire: bit_length of its tower's q.
    unsigned bits_of(uint64_t r) const { return bit_length(modulus_of(r)); }
    // Payload bytes of one element (c0 or c1: T runs of ring_dim residues) and one ciphertext.
    uint64_t element_bytes() const {
        uint64_t bits = 0;
        for (uint64_t q : moduli) bits += bit_length(q);
        return ring_dim * bits / 8;  // ring_dim >= 1024: whole bytes
    }
    uint64_t ciphertext_bytes() const { return elements * element_bytes(); }
    // Byte offset in the payload of residue index r; r - (start of its tower run) must be a
    // multiple of 8 (then the residue starts on a byte).
    uint64_t byte_offset(uint64_t r) const {
        const uint64_t towers = moduli.size(), run = r / ring_dim, within = r % ring_dim;
        const uint64_t per_ct = uint64_t{elements} * towers;
        const uint64_t ct = run / per_ct, k = run % per_ct, t = k % towers;
        uint64_t prefix = 0;
        for (uint64_t i = 0; i < t; ++i) prefix += ring_dim * bit_length(moduli[i]) / 8;
        return ct * ciphertext_bytes() + (k / towers) * element_bytes() + prefix +
               within * bit_length(moduli[t]) / 8;
    }
    size_t header_size() const { return kHeaderSize + 8 * (moduli.empty() ? 0 : moduli.size() - 1); }
    uint64_t total_residues() const { return residues_per_ciphertext() * n_ciphertexts; }
    uint64_t values_per_ciphertext() const {
        return packing == Packing::Complex ? ring_dim : ring_dim / 2;
    }
};

// Checks the header's own consistency (throws InvalidUpdateError naming the field).
void validate_header(const UpdateHeader& h);

// Bytes between the header and the checksum: the payload, then the seeds.
inline uint64_t body_len(const UpdateHeader& h) { return h.payload_len + h.seeds_len(); }

// Bytes of a whole serialized update (header + payload + seeds + checksum).
inline size_t update_size(const UpdateHeader& h) {
    return h.header_size() + body_len(h) + kChecksumSize;
}

// Writes the header and the checksum around a payload (and seeds) already at
// out + h.header_size(); out holds update_size(h) bytes. Lets callers build the payload in
// place (no copies).
void seal_update(const UpdateHeader& h, uint8_t* out, unsigned threads);

// Serializes header + body + checksum. body must hold body_len(h) bytes (payload, then seeds).
std::string encode_update(const UpdateHeader& h, const uint8_t* body, unsigned threads);

// Parses and validates a whole update (every byte hostile): magic, version, field ranges,
// exact length, checksum, distinct seeds. Returns the header; the payload starts at
// data + h.header_size(), the seeds right after it.
UpdateHeader parse_update(const uint8_t* data, size_t len, unsigned threads);

// residue_bits of a list of moduli: the largest bit_length.
unsigned residue_bits_of(const std::vector<uint64_t>& moduli);

}  // namespace fedshield
