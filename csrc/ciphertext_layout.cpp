#include "ciphertext_layout.hpp"

#include <cstring>

#include "errors.hpp"

namespace fedshield {
namespace {

inline uint64_t load64(const uint8_t* p) {
    uint64_t v;
    std::memcpy(&v, p, 8);
    return v;
}

bool is_residue_array(const uint8_t* data, size_t len, size_t at, uint64_t n, uint64_t q) {
    if (at + 8 > len || load64(data + at) != n) return false;
    if (len - at - 8 < n * 8) return false;
    const uint8_t* p = data + at + 8;
    for (uint64_t i = 0; i < n; ++i)
        if (load64(p + 8 * i) >= q) return false;
    return true;
}

}  // namespace

std::vector<uint64_t> find_residue_arrays(const uint8_t* data, size_t len, uint64_t ring_dim,
                                          uint64_t modulus, const char* what, size_t expected) {
    // ring_dim is bounded like the wire format's, so ring_dim * 8 below cannot overflow
    if (ring_dim == 0 || ring_dim > (1u << 17) || modulus < 3)
        throw InvalidUpdateError(std::string(what) + " layout: ring_dim must be in [1, 131072] "
                                 "and the modulus at least 3");
    std::vector<uint64_t> found;
    size_t at = 0;
    while (at + 8 <= len) {
        if (is_residue_array(data, len, at, ring_dim, modulus)) {
            found.push_back(at + 8);
            at += 8 + ring_dim * 8;  // arrays cannot overlap
        } else {
            ++at;
        }
    }
    if (found.size() != expected)
        throw InvalidUpdateError(std::string(what) + " layout: expected " +
                                 std::to_string(expected) + " residue array(s) of length " +
                                 std::to_string(ring_dim) + " below the modulus, found " +
                                 std::to_string(found.size()) + " (not a one-tower " + what +
                                 " of this context?)");
    return found;
}

CiphertextLayout locate_residues(const uint8_t* data, size_t len, uint64_t ring_dim,
                                 uint64_t modulus) {
    const std::vector<uint64_t> found =
        find_residue_arrays(data, len, ring_dim, modulus, "ciphertext", 2);
    CiphertextLayout layout;
    layout.ring_dim = ring_dim;
    layout.modulus = modulus;
    layout.c0_offset = found[0];
    layout.c1_offset = found[1];
    layout.total_size = len;
    return layout;
}

static void check_fits(size_t len, const CiphertextLayout& layout) {
    if (len != layout.total_size)
        throw InvalidUpdateError("ciphertext layout: serialized ciphertext has " +
                                 std::to_string(len) + " bytes, the template has " +
                                 std::to_string(layout.total_size));
    // A layout also arrives from outside (a context file's ct_layout, a Python tuple): check
    // that both arrays and their length words lie inside the buffer, in order, before any
    // memcpy reads or writes through them. Without this a forged context file made
    // extract/write_residues read and write out of bounds (segfault on decrypt).
    const uint64_t n = layout.ring_dim, c0 = layout.c0_offset, c1 = layout.c1_offset;
    const bool ok = n >= 1 && n <= (1u << 17) && c0 >= 8 && c0 <= len &&
                    len - c0 >= 8 * n && c1 >= c0 + 8 * n + 8 && c1 <= len && len - c1 >= 8 * n;
    if (!ok)
        throw InvalidUpdateError("ciphertext layout: residue offsets (" + std::to_string(c0) +
                                 ", " + std::to_string(c1) + ") for ring_dim " +
                                 std::to_string(n) + " do not fit a " + std::to_string(len) +
                                 "-byte ciphertext");
}

void extract_residues(const uint8_t* data, size_t len, const CiphertextLayout& layout,
                      uint64_t* out) {
    check_fits(len, layout);
    const uint64_t n = layout.ring_dim;
    if (load64(data + layout.c0_offset - 8) != n || load64(data + layout.c1_offset - 8) != n)
        throw InvalidUpdateError("ciphertext layout: residue array lengths moved");
    std::memcpy(out, data + layout.c0_offset, n * 8);
    std::memcpy(out + n, data + layout.c1_offset, n * 8);
    for (uint64_t i = 0; i < 2 * n; ++i)
        if (out[i] >= layout.modulus)
            throw InvalidUpdateError("ciphertext layout: residue not below the modulus");
}

void write_residues(uint8_t* data, size_t len, const CiphertextLayout& layout,
                    const uint64_t* residues) {
    check_fits(len, layout);
    const uint64_t n = layout.ring_dim;
    std::memcpy(data + layout.c0_offset, residues, n * 8);
    std::memcpy(data + layout.c1_offset, residues + n, n * 8);
}

}  // namespace fedshield
