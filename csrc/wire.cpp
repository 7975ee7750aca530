#include "wire.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "bitpack.hpp"
#include "checksum.hpp"
#include "ciphertext_layout.hpp"
#include "errors.hpp"

namespace fedshield {
namespace {

constexpr char kMagic[8] = {'F', 'S', 'H', 'L', 'D', 'U', 'P', 'D'};
constexpr uint32_t kMinRingDim = 1024;
constexpr uint32_t kMaxRingDim = 1u << 17;

template <class T>
T get(const uint8_t* data, size_t at) {
    T v;
    std::memcpy(&v, data + at, sizeof v);
    return v;
}

[[noreturn]] void bad(const std::string& what) {
    throw InvalidUpdateError("invalid update: " + what);
}

}  // namespace

unsigned bit_length(uint64_t q) {
    unsigned b = 0;
    while (q) {
        ++b;
        q >>= 1;
    }
    return b;
}

unsigned residue_bits_of(const std::vector<uint64_t>& moduli) {
    unsigned bits = 0;
    for (uint64_t q : moduli) bits = std::max(bits, bit_length(q));
    return bits;
}

void validate_header(const UpdateHeader& h) {
    if (h.kind != UpdateKind::Client && h.kind != UpdateKind::Aggregate)
        bad("kind " + std::to_string(static_cast<unsigned>(h.kind)) + " is not 1 or 2");
    if (h.n_summed < 1) bad("n_summed is 0");
    if (h.kind == UpdateKind::Client && h.n_summed != 1)
        bad("a client update must have n_summed 1, got " + std::to_string(h.n_summed));
    if (h.ring_dim < kMinRingDim || h.ring_dim > kMaxRingDim || (h.ring_dim & (h.ring_dim - 1)))
        bad("ring_dim " + std::to_string(h.ring_dim) + " is not a power of two in [1024, 131072]");
    if (h.moduli.empty() || h.moduli.size() > kMaxTowers)
        bad("n_towers " + std::to_string(h.moduli.size()) + " is not in [1, " +
            std::to_string(kMaxTowers) + "]");
    for (size_t i = 0; i < h.moduli.size(); ++i) {
        const uint64_t q = h.moduli[i];
        if (q < 3 || (q & 1) == 0)
            bad("modulus " + std::to_string(q) + " of tower " + std::to_string(i) +
                " is not an odd modulus >= 3");
        for (size_t j = 0; j < i; ++j)
            if (h.moduli[j] == q)
                bad("modulus " + std::to_string(q) + " appears twice among the towers");
    }
    const unsigned bits = residue_bits_of(h.moduli);
    if (h.residue_bits != bits || h.residue_bits > 62)
        bad("residue_bits " + std::to_string(h.residue_bits) + " does not match the modulus (" +
            std::to_string(bits) + " bits, at most 62)");
    if (h.packing != Packing::Complex && h.packing != Packing::Real)
        bad("packing " + std::to_string(static_cast<unsigned>(h.packing)) + " is not 1 or 2");
    if (h.elements != 1 && h.elements != 2)
        bad("elements " + std::to_string(h.elements) + " is not 1 (seeded) or 2");
    if (h.n_ciphertexts < 1) bad("n_ciphertexts is 0");
    const uint64_t cap = h.values_per_ciphertext();
    // The fewest ciphertexts that hold the values: no padding ciphertexts on the wire.
    if (h.n_values < 1 || h.n_values > cap * h.n_ciphertexts ||
        h.n_values <= cap * (h.n_ciphertexts - 1))
        bad("n_values " + std::to_string(h.n_values) + " does not fill " +
            std::to_string(h.n_ciphertexts) + " ciphertexts of " + std::to_string(cap) + " values");
    if (!std::isfinite(h.weight_bound) || h.weight_bound <= 0)
        bad("weight_bound is not a positive finite number");
    if (h.payload_len != h.n_ciphertexts * h.ciphertext_bytes())
        bad("payload_len " + std::to_string(h.payload_len) + " does not match " +
            std::to_string(h.n_ciphertexts) + " ciphertexts of ring_dim " +
            std::to_string(h.ring_dim));
}

void seal_update(const UpdateHeader& h, uint8_t* out, unsigned threads) {
    validate_header(h);
    auto put_at = [out](size_t at, auto v) { std::memcpy(out + at, &v, sizeof v); };
    std::memcpy(out, kMagic, 8);
    put_at(8, kWireVersion);
    put_at(10, static_cast<uint16_t>(h.kind));
    put_at(12, h.n_summed);
    std::memcpy(out + 16, h.context_fp.data(), 32);
    std::memcpy(out + 48, h.layout_fp.data(), 32);
    std::memcpy(out + 80, h.mask_fp.data(), 32);
    put_at(112, h.round);
    put_at(120, h.n_values);
    put_at(128, h.ring_dim);
    put_at(132, h.n_ciphertexts);
    put_at(136, h.moduli[0]);
    put_at(144, h.residue_bits);
    put_at(145, static_cast<uint8_t>(h.packing));
    put_at(146, static_cast<uint8_t>(h.moduli.size()));
    put_at(147, h.elements);
    std::memset(out + 148, 0, 4);
    put_at(152, h.weight_bound);
    put_at(160, h.payload_len);
    for (size_t i = 1; i < h.moduli.size(); ++i) put_at(kHeaderSize + 8 * (i - 1), h.moduli[i]);
    const size_t body = h.header_size() + body_len(h);
    put_at(body, wire_checksum(out, body, threads));
}

std::string encode_update(const UpdateHeader& h, const uint8_t* body, unsigned threads) {
    validate_header(h);
    std::string out(update_size(h), '\0');
    auto* p = reinterpret_cast<uint8_t*>(&out[0]);
    if (body_len(h)) std::memcpy(p + h.header_size(), body, body_len(h));
    seal_update(h, p, threads);
    return out;
}

static void check_seeds(const UpdateHeader& h, const uint8_t* seeds) {
    if (!h.seeded()) return;
    std::vector<std::array<uint8_t, kSeedSize>> sorted(h.n_summed);
    for (uint64_t i = 0; i < h.n_summed; ++i)
        std::memcpy(sorted[i].data(), seeds + i * kSeedSize, kSeedSize);
    std::sort(sorted.begin(), sorted.end());
    if (std::adjacent_find(sorted.begin(), sorted.end()) != sorted.end())
        bad("a seed appears twice (one client update summed in twice?)");
}

UpdateHeader parse_update(const uint8_t* data, size_t len, unsigned threads) {
    if (len < kHeaderSize + kChecksumSize)
        bad("truncated: " + std::to_string(len) + " bytes, a header alone needs " +
            std::to_string(kHeaderSize + kChecksumSize));
    if (std::memcmp(data, kMagic, 8) != 0) bad("bad magic (not a fedshield update)");
    const uint16_t version = get<uint16_t>(data, 8);
    if (version != kWireVersion && version != 2)
        bad("wire version " + std::to_string(version) + " is not supported (expected 2 or " +
            std::to_string(kWireVersion) + ")");
    // version 2: byte 147 was reserved (zero) and every ciphertext had both elements
    for (size_t i = version == 2 ? 147 : 148; i < 152; ++i)
        if (data[i] != 0) bad("reserved header bytes are not zero");
    UpdateHeader h;
    h.kind = static_cast<UpdateKind>(get<uint16_t>(data, 10));
    h.n_summed = get<uint32_t>(data, 12);
    std::memcpy(h.context_fp.data(), data + 16, 32);
    std::memcpy(h.layout_fp.data(), data + 48, 32);
    std::memcpy(h.mask_fp.data(), data + 80, 32);
    h.round = get<uint64_t>(data, 112);
    h.n_values = get<uint64_t>(data, 120);
    h.ring_dim = get<uint32_t>(data, 128);
    h.n_ciphertexts = get<uint32_t>(data, 132);
    const unsigned towers = get<uint8_t>(data, 146);
    if (towers < 1 || towers > kMaxTowers)
        bad("n_towers " + std::to_string(towers) + " is not in [1, " + std::to_string(kMaxTowers) +
            "]");
    const size_t header_len = kHeaderSize + 8 * (towers - 1);
    if (len < header_len + kChecksumSize)
        bad("truncated: " + std::to_string(len) + " bytes, a " + std::to_string(towers) +
            "-tower header alone needs " + std::to_string(header_len + kChecksumSize));
    h.moduli.resize(towers);
    h.moduli[0] = get<uint64_t>(data, 136);
    for (unsigned i = 1; i < towers; ++i) h.moduli[i] = get<uint64_t>(data, kHeaderSize + 8 * (i - 1));
    h.residue_bits = get<uint8_t>(data, 144);
    h.packing = static_cast<Packing>(get<uint8_t>(data, 145));
    h.elements = version == 2 ? 2 : get<uint8_t>(data, 147);
    h.weight_bound = get<double>(data, 152);
    h.payload_len = get<uint64_t>(data, 160);
    validate_header(h);
    // Overflow-safe: payload_len <= 2^32 * 2^18 * 62 / 8 < 2^56 after validate_header, and the
    // seeds are at most 2^32 * 32 bytes.
    const uint64_t expected = h.header_size() + body_len(h) + kChecksumSize;
    if (len != expected)
        bad((len < expected ? "truncated: " : "trailing bytes: ") + std::to_string(len) +
            " bytes, the header announces " + std::to_string(expected));
    const size_t body = h.header_size() + body_len(h);
    if (get<uint64_t>(data, body) != wire_checksum(data, body, threads))
        bad("checksum mismatch (corrupted or tampered bytes)");
    check_seeds(h, data + h.header_size() + h.payload_len);
    return h;
}

}  // namespace fedshield
