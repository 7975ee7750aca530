#include "ciphertext_layout.hpp"

#include <algorithm>
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

bool all_below(const uint8_t* p, uint64_t n, uint64_t q) {
    for (uint64_t i = 0; i < n; ++i)
        if (load64(p + 8 * i) >= q) return false;
    return true;
}

}  // namespace

void check_moduli(const std::vector<uint64_t>& moduli, const char* what) {
    if (moduli.empty() || moduli.size() > kMaxTowers)
        throw InvalidUpdateError(std::string(what) + ": " + std::to_string(moduli.size()) +
                                 " RNS towers, expected 1 to " + std::to_string(kMaxTowers));
    for (size_t i = 0; i < moduli.size(); ++i) {
        const uint64_t q = moduli[i];
        if (q < 3 || (q & 1) == 0 || q >= (uint64_t{1} << 62))
            throw InvalidUpdateError(std::string(what) + ": modulus " + std::to_string(q) +
                                     " is not an odd modulus in [3, 2**62)");
        for (size_t j = 0; j < i; ++j)
            if (moduli[j] == q)
                throw InvalidUpdateError(std::string(what) + ": modulus " + std::to_string(q) +
                                         " appears twice among the towers");
    }
}

std::vector<uint64_t> find_residue_arrays(const uint8_t* data, size_t len, uint64_t ring_dim,
                                          const std::vector<uint64_t>& moduli, const char* what,
                                          size_t expected) {
    // ring_dim is bounded like the wire format's, so ring_dim * 8 below cannot overflow
    if (ring_dim == 0 || ring_dim > (1u << 17))
        throw InvalidUpdateError(std::string(what) + " layout: ring_dim must be in [1, 131072]");
    check_moduli(moduli, (std::string(what) + " layout").c_str());
    const uint64_t q_max = *std::max_element(moduli.begin(), moduli.end());
    const size_t towers = moduli.size();
    std::vector<uint64_t> found;
    size_t at = 0;
    while (at + 8 <= len) {
        if (is_residue_array(data, len, at, ring_dim, q_max)) {
            found.push_back(at + 8);
            at += 8 + ring_dim * 8;  // arrays cannot overlap
        } else {
            ++at;
        }
    }
    const std::string tail = " (not a " + std::to_string(towers) + "-tower " + what +
                             " of this context?)";
    if (found.size() != expected)
        throw InvalidUpdateError(std::string(what) + " layout: expected " +
                                 std::to_string(expected) + " residue array(s) of length " +
                                 std::to_string(ring_dim) + " below the modulus, found " +
                                 std::to_string(found.size()) + tail);
    for (size_t k = 0; k < found.size(); ++k)
        if (!all_below(data + found[k], ring_dim, moduli[k % towers]))
            throw InvalidUpdateError(std::string(what) + " layout: residue array " +
                                     std::to_string(k) + " is not below tower " +
                                     std::to_string(k % towers) + "'s modulus" + tail);
    return found;
}

CiphertextLayout locate_residues(const uint8_t* data, size_t len, uint64_t ring_dim,
                                 const std::vector<uint64_t>& moduli) {
    CiphertextLayout layout;
    layout.offsets = find_residue_arrays(data, len, ring_dim, moduli, "ciphertext",
                                         2 * moduli.size());
    layout.ring_dim = ring_dim;
    layout.moduli = moduli;
    layout.total_size = len;
    return layout;
}

void check_layout(const CiphertextLayout& layout, size_t len, size_t elements) {
    if (len != layout.total_size)
        throw InvalidUpdateError("ciphertext layout: serialized ciphertext has " +
                                 std::to_string(len) + " bytes, the template has " +
                                 std::to_string(layout.total_size));
    check_moduli(layout.moduli, "ciphertext layout");
    // A layout also arrives from outside (a context file's ct_layout, a Python tuple): check
    // that every array and its length word lie inside the buffer, in order, before any memcpy
    // reads or writes through them. Without this a forged context file made
    // extract/write_residues read and write out of bounds (segfault on decrypt).
    const uint64_t n = layout.ring_dim;
    bool ok = n >= 1 && n <= (1u << 17) && layout.offsets.size() == elements * layout.towers();
    uint64_t next = 8;  // the first array's length word starts at 0 at the earliest
    for (size_t k = 0; ok && k < layout.offsets.size(); ++k) {
        const uint64_t off = layout.offsets[k];
        ok = off >= next && off <= len && len - off >= 8 * n;
        next = off + 8 * n + 8;
    }
    if (!ok) {
        std::string offs;
        for (uint64_t off : layout.offsets) offs += (offs.empty() ? "" : ", ") + std::to_string(off);
        throw InvalidUpdateError("ciphertext layout: residue offsets (" + offs +
                                 ") for ring_dim " + std::to_string(n) + " do not fit a " +
                                 std::to_string(len) + "-byte ciphertext");
    }
}

void extract_residues(const uint8_t* data, size_t len, const CiphertextLayout& layout,
                      uint64_t* out) {
    check_layout(layout, len);
    const uint64_t n = layout.ring_dim;
    const size_t towers = layout.towers();
    for (size_t k = 0; k < layout.offsets.size(); ++k) {
        const uint64_t off = layout.offsets[k];
        if (load64(data + off - 8) != n)
            throw InvalidUpdateError("ciphertext layout: residue array lengths moved");
        std::memcpy(out + k * n, data + off, n * 8);
        const uint64_t q = layout.moduli[k % towers];
        for (uint64_t i = 0; i < n; ++i)
            if (out[k * n + i] >= q)
                throw InvalidUpdateError("ciphertext layout: residue not below the modulus");
    }
}

void write_residues(uint8_t* data, size_t len, const CiphertextLayout& layout,
                    const uint64_t* residues) {
    check_layout(layout, len);
    const uint64_t n = layout.ring_dim;
    for (size_t k = 0; k < layout.offsets.size(); ++k)
        std::memcpy(data + layout.offsets[k], residues + k * n, n * 8);
}

}  // namespace fedshield
