// AES-256 in counter mode (FIPS 197, NIST SP 800-38A) with the AES-NI instructions: the stream
// seeded ciphertexts expand `a` from (seeded.hpp, he/seeded.py), and the generator of the
// encryption noise. The counter block is one 128-bit big-endian integer incremented per block,
// as in SP 800-38A and the `cryptography` package, which the tests check it against bit for
// bit (and against SP 800-38A's test vectors).
#pragma once
#include <cstddef>
#include <cstdint>

namespace fedshield {

// Whether this CPU has AES-NI (the native expansion and noise generator need it).
bool have_aes_ni();

class AesCtr {
public:
    // key: 32 bytes; counter: the 16-byte initial counter block. Throws ParameterInputError
    // without AES-NI.
    AesCtr(const uint8_t* key, const uint8_t* counter);
    ~AesCtr();
    AesCtr(const AesCtr&) = delete;
    AesCtr& operator=(const AesCtr&) = delete;
    // The next `blocks` 16-byte blocks of key stream.
    void stream(uint8_t* out, size_t blocks);

private:
    alignas(16) uint8_t round_keys_[15 * 16];
    uint64_t hi_ = 0, lo_ = 0;  // the counter block as a big-endian 128-bit integer
};

// Residues uniform mod q for ciphertext k, tower t of a seeded update: AES-256-CTR keyed by
// `key` (32 bytes) from the counter block (k: 8 bytes LE, t: 4 bytes LE, 4 zero bytes), 8-byte
// little-endian words masked to bit_length(q) bits and rejected when >= q. With `accumulate`,
// added into out mod q instead of written.
void expand_uniform(const uint8_t* key, uint64_t k, uint32_t t, uint64_t q, uint64_t n,
                    uint64_t* out, bool accumulate);

// 64-bit words from AES-256-CTR under a fresh key from the kernel CSPRNG (a new key per
// instance; buffers wiped), or straight from the kernel without AES-NI.
class FastRandom {
public:
    FastRandom();
    ~FastRandom();
    FastRandom(const FastRandom&) = delete;
    FastRandom& operator=(const FastRandom&) = delete;
    uint64_t next() {
        if (used_ == kWords) refill();
        return block_[used_++];
    }
    // out[i] = next() for i < n, in bulk.
    void fill(uint64_t* out, size_t n);

private:
    void refill();
    static constexpr size_t kWords = 1024;
    AesCtr* aes_ = nullptr;
    uint64_t block_[kWords];
    size_t used_ = kWords;
};

}  // namespace fedshield
