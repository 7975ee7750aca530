// fedshield's own CKKS arithmetic for the add-only (depth 0) ciphertexts of a federation, made
// to interoperate with OpenFHE (openfhe 1.6.1, CKKSRNS, FIXEDMANUAL, CKKSDataType COMPLEX), which
// stays the key generator and the reference every test checks against. No OpenFHE code is used;
// what had to match was read from its sources:
//
// * Encoding (CKKSPackedEncoding::Encode/Decode, DiscreteFourierTransform::FFTSpecial/Inv, in
//   src/pke/lib/encoding/ckkspackedencoding.cpp and src/core/lib/math/dftransform.cpp): N/2
//   complex slots; the inverse "special" FFT over the rotation group 5^j mod 2N, scaled by
//   2^scale_bits and rounded; coefficient i holds the real part of the i-th result and
//   coefficient i + N/2 its imaginary part. Decoding undoes it (centered residues / scale).
// * Encryption (PKERNS::EncryptZeroCore in src/pke/lib/schemerns/rns-pke.cpp): secret key:
//   (a*s + e + m, -a); public key (p0, p1): (p0*v + e0 + m, p1*v + e1), v ternary uniform,
//   e's discrete Gaussian of standard deviation 3.19 (OpenFHE's default). Decryption c0 + c1*s.
// * Threshold decryption (MultipartyRNS::MultipartyDecryptLead/Main in
//   src/pke/lib/schemerns/rns-multiparty.cpp, MultipartyCKKSRNS::MultipartyDecryptFusion in
//   src/pke/lib/scheme/ckksrns/ckksrns-multiparty.cpp): the lead party's share is
//   c0 + c1*s_i + e, every other party's c1*s_i + e, with e a discrete Gaussian of standard
//   deviation NoiseFlooding::MP_SD = 1048576 = 2^20 (src/pke/include/constants.h; the default
//   FIXED_NOISE_MULTIPARTY mode, noise scale 1 for CKKS); fusion sums the shares.
//
// Polynomials are T RNS towers of N residues, in OpenFHE's evaluation (NTT) form as it
// serializes them (flood.hpp: ntt_forward) unless said otherwise. Key-dependent loops have no
// secret-dependent branches or table look-ups; every buffer of key, plaintext or noise is wiped.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "wire.hpp"

namespace fedshield {

// OpenFHE's default standard deviation of encryption errors, and of a partial decryption's
// smudging noise (see above).
constexpr double kErrorSigma = 3.19;
constexpr uint64_t kSmudgingSigma2 = uint64_t{1} << 40;  // (2^20)^2

// One context's ring: N, each tower's modulus and primitive 2N-th root of unity, the scale.
struct CkksRing {
    uint64_t ring_dim = 0;
    std::vector<uint64_t> moduli, roots;
    int scale_bits = 0;
    bool complex_packing = true;  // N reals per ciphertext (2 per slot) or N/2

    size_t towers() const { return moduli.size(); }
    uint64_t values_per_ciphertext() const { return complex_packing ? ring_dim : ring_dim / 2; }
};

// Checks N (power of two in [1024, 2^17]), the moduli and their roots (ParameterInputError).
void check_ring(const CkksRing& ring);

// The flooding noise added before decoding: a discrete Gaussian of integer variance
// sigma2 = hi * 2^64 + lo (flood.hpp); 0: none.
struct FloodWidth {
    uint64_t hi = 0, lo = 0;
    bool any() const { return hi != 0 || lo != 0; }
};

// --- the NTT of one tower (exposed for the tests and timings) -------------------------------

// Which implementation runs: the one the CKKS code picks for the modulus and the CPU (four
// lanes where it can, else scalar), scalar 64-bit words, or four 64-bit lanes with AVX2
// (q < 2^60). Both give the same residues.
enum class NttPath { automatic, scalar, avx2 };

// The path `automatic` takes for n residues mod q on this CPU.
NttPath ntt_auto_path(size_t n, uint64_t q);

// In place: n residues (n a power of two in [16, 2^17]) below the prime q < 2^62, psi a
// primitive 2n-th root of unity mod q, from coefficients to OpenFHE's evaluation order, or back
// when `inverse`. ParameterInputError for a bad argument or a path this CPU or q cannot take.
void ntt_tower(uint64_t* a, size_t n, uint64_t q, uint64_t psi, bool inverse, NttPath path);

// --- the special FFT of encoding (exposed for the tests and timings) ------------------------

// Which implementation runs: the one the CKKS code picks on this CPU, the plain loops, or the
// AVX2 one (slots >= 16). Both give the same doubles.
enum class FftPath { automatic, scalar, avx2 };

// In place: the N/2 complex values of ring dimension n (n a power of two in [4, 2^17]), re/im
// interleaved, from coefficients to slot values (decoding's transform), or back when `inverse`
// (encoding's, with its 1/(N/2) scaling). ParameterInputError for a bad n or a path this CPU
// cannot take.
void special_fft(double* v, size_t n, bool inverse, FftPath path);

// --- encoding -----------------------------------------------------------------------------

// values_per_ciphertext() reals -> T * N residues of the encoded plaintext plus `add` (N small
// integers, or null) in coefficient form.
void encode_coefficients(const CkksRing& ring, const double* values, const int64_t* add,
                         uint64_t* out);

// T * N residues in coefficient form -> values_per_ciphertext() reals (OpenFHE's Decode).
void decode_coefficients(const CkksRing& ring, const uint64_t* coeffs, double* out);

// --- decryption ---------------------------------------------------------------------------

// Decrypts every ciphertext of a serialized update (parsed and validated here) with the secret
// key s (T * N residues, evaluation form): out[k * values_per_ciphertext + j]. A seeded
// update's c1 is the sum of the expansions (aes_ctr.hpp: expand_uniform) of its n_summed seeds'
// stream keys (n_keys * 32 bytes), or, when `c1` is given, c1 (n_ciphertexts * T * N
// residues); flooding of variance `w` is added to each decryption before decoding.
void decrypt_update(const uint8_t* data, size_t len, const CkksRing& ring, const uint64_t* s,
                    const uint64_t* c1, size_t c1_len, const uint8_t* stream_keys,
                    size_t n_keys, FloodWidth w, unsigned threads, double* out,
                    size_t out_len);

// A party's partial decryption of every ciphertext of an (unseeded) aggregate with its key
// s_i: (lead ? c0 : 0) + c1 * s_i + e, e a discrete Gaussian of variance kSmudgingSigma2
// (smudging.hpp; with flooding of variance w != 0: an exact one of variance
// w + kSmudgingSigma2, discrete_gaussian.hpp); each bit-packed as
// partial_codec.hpp describes.
std::vector<std::string> partial_decrypt_update(const uint8_t* data, size_t len,
                                                const CkksRing& ring, const uint64_t* s,
                                                bool lead, FloodWidth w, unsigned threads);

// Fuses packed partial decryptions: shares[p][k] is party p's share of ciphertext k (each
// validated: size, residues below their modulus); out as in decrypt_update.
void fuse_partials(const std::vector<std::vector<std::pair<const uint8_t*, size_t>>>& shares,
                   const CkksRing& ring, unsigned threads, double* out, size_t out_len);

// --- encryption ---------------------------------------------------------------------------

// Encrypts n_ciphertexts * values_per_ciphertext reals into a whole serialized update for
// `header` (ring_dim, moduli and packing must be the ring's; payload_len is filled in).
// Seeded (header.elements == 1): c0 = m + e - a*s with a expanded from the seed's stream key
// `a_key` (32 bytes) per ciphertext, or taken from `a` (n_ciphertexts * T * N residues) when
// given; `seed` is written after the payload. Otherwise public-key encryption under (p0, p1)
// (T * N residues each), both elements on the wire.
std::string encrypt_update(UpdateHeader header, const CkksRing& ring, const double* values,
                           size_t n_values, const uint64_t* s, const uint64_t* a,
                           const uint8_t* a_key, const uint8_t* seed, const uint64_t* p0,
                           const uint64_t* p1, unsigned threads);

// --- samplers (exposed for the statistical tests) -----------------------------------------

// n samples of the discrete Gaussian of standard deviation kErrorSigma (constant-time table
// comparison, kernel CSPRNG).
void sample_error(int64_t* out, size_t n);
// n samples uniform in {-1, 0, 1}.
void sample_ternary(int64_t* out, size_t n);

}  // namespace fedshield
