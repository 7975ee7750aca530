// pybind11 binding of fedshield's own CKKS arithmetic (csrc/ckks.cpp). Every call releases the
// GIL for its arithmetic and runs on the native thread pool (threads = 0: default_threads()).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "aes_ctr.hpp"
#include "ckks.hpp"
#include "parallel.hpp"
#include "secure_wipe.hpp"
#include "smudging.hpp"

namespace py = pybind11;
using namespace fedshield;

UpdateHeader header_from_pydict(const py::dict& d);  // bindings.cpp

namespace {

using U64 = py::array_t<uint64_t, py::array::c_style>;
using F64 = py::array_t<double, py::array::c_style>;
using I64 = py::array_t<int64_t, py::array::c_style>;

// (ring_dim, moduli, roots, scale_bits, complex_packing)
CkksRing ring_of(const py::tuple& t) {
    if (t.size() != 5)
        throw py::value_error("a CKKS ring is (ring_dim, moduli, roots, scale_bits, complex)");
    CkksRing r;
    r.ring_dim = t[0].cast<uint64_t>();
    r.moduli = t[1].cast<std::vector<uint64_t>>();
    r.roots = t[2].cast<std::vector<uint64_t>>();
    r.scale_bits = t[3].cast<int>();
    r.complex_packing = t[4].cast<bool>();
    check_ring(r);
    return r;
}

std::string_view view_of(const py::buffer& b, py::buffer_info& info) {
    info = b.request();
    if (info.ndim > 1 || (info.ndim == 1 && info.strides[0] != info.itemsize))
        throw py::value_error("expected a contiguous one-dimensional buffer");
    return {static_cast<const char*>(info.ptr), static_cast<size_t>(info.size * info.itemsize)};
}

const uint8_t* u8(std::string_view v) { return reinterpret_cast<const uint8_t*>(v.data()); }

// A key (T * N residues, evaluation form) of the ring's size.
void check_key(const U64& key, const CkksRing& r, const char* what) {
    if (static_cast<uint64_t>(key.size()) != r.towers() * r.ring_dim)
        throw py::value_error(std::string(what) + " needs " +
                              std::to_string(r.towers() * r.ring_dim) + " residues, got " +
                              std::to_string(key.size()));
}

unsigned threads_or_default(unsigned threads) { return threads ? threads : default_threads(); }

}  // namespace

void bind_ckks(py::module_& m) {
    m.attr("CKKS_ERROR_SIGMA") = kErrorSigma;
    m.attr("CKKS_SMUDGING_SIGMA2") = kSmudgingSigma2;
    m.def("ckks_encode", [](const py::tuple& ring, const F64& values) {
        const CkksRing r = ring_of(ring);
        if (static_cast<uint64_t>(values.size()) != r.values_per_ciphertext())
            throw py::value_error("ckks_encode: one ciphertext's values are needed");
        U64 out(static_cast<py::ssize_t>(r.towers() * r.ring_dim));
        const double* v = values.data();
        uint64_t* o = out.mutable_data();
        py::gil_scoped_release nogil;
        encode_coefficients(r, v, nullptr, o);
        return out;
    }, "One ciphertext's values -> the encoded plaintext's residues (coefficient form).");
    m.def("ckks_decode", [](const py::tuple& ring, const U64& coeffs) {
        const CkksRing r = ring_of(ring);
        check_key(coeffs, r, "ckks_decode");
        F64 out(static_cast<py::ssize_t>(r.values_per_ciphertext()));
        const uint64_t* c = coeffs.data();
        double* o = out.mutable_data();
        py::gil_scoped_release nogil;
        decode_coefficients(r, c, o);
        return out;
    }, "Residues of a plaintext in coefficient form -> its values (OpenFHE's decoding).");
    m.def("ckks_ntt", [](const U64& a, uint64_t q, uint64_t psi, bool inverse,
                         const std::string& path) {
        NttPath p = NttPath::automatic;
        if (path == "scalar")
            p = NttPath::scalar;
        else if (path == "avx2")
            p = NttPath::avx2;
        else if (path != "auto")
            throw py::value_error("ckks_ntt: path " + path +
                                  " is not one of 'auto', 'scalar', 'avx2'");
        U64 out(a.size());
        std::memcpy(out.mutable_data(), a.data(), static_cast<size_t>(a.size()) * 8);
        uint64_t* o = out.mutable_data();
        const size_t n = static_cast<size_t>(a.size());
        py::gil_scoped_release nogil;
        ntt_tower(o, n, q, psi, inverse, p);
        return out;
    }, "One tower's NTT as the CKKS code runs it (coefficients -> OpenFHE's evaluation order, or "
       "back with inverse=True) on a copy of a, by the named path or the one it picks ('auto').",
       py::arg("a"), py::arg("q"), py::arg("psi"), py::arg("inverse") = false,
       py::arg("path") = "auto");
    m.def("ckks_fft", [](const py::buffer& v, bool inverse, const std::string& path) {
        FftPath p = FftPath::automatic;
        if (path == "scalar")
            p = FftPath::scalar;
        else if (path == "avx2")
            p = FftPath::avx2;
        else if (path != "auto")
            throw py::value_error("ckks_fft: path " + path +
                                  " is not one of 'auto', 'scalar', 'avx2'");
        // in place, no copy: a timing of the transform, not of a 32-64 KB memcpy
        py::buffer_info info = v.request(true);
        if (info.format != py::format_descriptor<double>::format() || info.ndim != 1 ||
            info.strides[0] != sizeof(double))
            throw py::value_error("ckks_fft: v must be a contiguous one-dimensional float64 "
                                  "array, got format " + info.format + " with " +
                                  std::to_string(info.ndim) + " dimensions");
        double* o = static_cast<double*>(info.ptr);
        const size_t n = static_cast<size_t>(info.size);
        py::gil_scoped_release nogil;
        special_fft(o, n, inverse, p);
    }, "CKKS encoding's special FFT in place on v (the N/2 complex values of ring dimension N "
       "as N float64, re/im interleaved, writable): coefficients -> slot values, or back with "
       "inverse=True, by the named path or the one the CKKS code takes ('auto').",
       py::arg("v"), py::arg("inverse") = false, py::arg("path") = "auto");
    m.def("ckks_ntt_path", [](size_t n, uint64_t q) {
        const NttPath p = ntt_auto_path(n, q);
        return std::string(p == NttPath::avx2 ? "avx2" : "scalar");
    }, "The path ckks_ntt's 'auto' (and every CKKS call) takes for n residues mod q here.",
       py::arg("n"), py::arg("q"));
    m.attr("HAVE_AES_NI") = have_aes_ni();
    m.def("expand_uniform", [](const py::bytes& key, uint64_t k, uint32_t t, uint64_t q,
                               uint64_t n) {
        const std::string kb = key;
        if (kb.size() != 32) throw py::value_error("expand_uniform: the key must be 32 bytes");
        U64 out(static_cast<py::ssize_t>(n));
        uint64_t* o = out.mutable_data();
        py::gil_scoped_release nogil;
        expand_uniform(reinterpret_cast<const uint8_t*>(kb.data()), k, t, q, n, o, false);
        return out;
    }, "n residues uniform mod q from AES-256-CTR (key, counter block (k, t)): a seeded "
       "update's a for ciphertext k, tower t.");
    m.def("aes256_ctr", [](const py::bytes& key, const py::bytes& counter, uint64_t blocks) {
        const std::string kb = key, cb = counter;
        if (kb.size() != 32 || cb.size() != 16)
            throw py::value_error("aes256_ctr: a 32-byte key and a 16-byte counter block");
        std::string out(16 * blocks, '\0');
        AesCtr aes(reinterpret_cast<const uint8_t*>(kb.data()),
                   reinterpret_cast<const uint8_t*>(cb.data()));
        aes.stream(reinterpret_cast<uint8_t*>(&out[0]), blocks);
        return py::bytes(out);
    }, "The AES-256-CTR key stream (SP 800-38A counter: one 128-bit big-endian integer).");
    m.def("ckks_decrypt", [](const py::buffer& update, const py::tuple& ring, const U64& s,
                             std::optional<U64> c1, const std::vector<py::bytes>& stream_keys,
                             uint64_t flood_hi, uint64_t flood_lo, uint64_t n_values,
                             unsigned threads) {
        const CkksRing r = ring_of(ring);
        check_key(s, r, "ckks_decrypt: the secret key");
        py::buffer_info info;
        const std::string_view v = view_of(update, info);
        F64 out(static_cast<py::ssize_t>(n_values));
        const uint64_t* c1_data = c1 ? c1->data() : nullptr;
        const size_t c1_len = c1 ? static_cast<size_t>(c1->size()) : 0;
        std::string keys;
        for (const auto& k : stream_keys) {
            const std::string kb = k;
            if (kb.size() != 32) throw py::value_error("ckks_decrypt: stream keys are 32 bytes");
            keys += kb;
        }
        const uint64_t* key = s.data();
        double* o = out.mutable_data();
        py::gil_scoped_release nogil;
        decrypt_update(u8(v), v.size(), r, key, c1_data, c1_len, u8(keys), stream_keys.size(),
                       FloodWidth{flood_hi, flood_lo}, threads_or_default(threads), o, n_values);
        return out;
    }, "Decrypts every ciphertext of an update with the secret key (seeded: c1 = the sum of "
       "its seeds' expansions, given as c1 or expanded here from the seeds' stream keys); "
       "n_values = n_ciphertexts * values per ciphertext.",
       py::arg("update"), py::arg("ring"), py::arg("s"), py::arg("c1"),
       py::arg("stream_keys"), py::arg("flood_hi"),
       py::arg("flood_lo"), py::arg("n_values"), py::arg("threads") = 0);
    m.def("ckks_partial_decrypt", [](const py::buffer& update, const py::tuple& ring,
                                     const U64& s, bool lead, uint64_t flood_hi,
                                     uint64_t flood_lo, unsigned threads) {
        const CkksRing r = ring_of(ring);
        check_key(s, r, "ckks_partial_decrypt: the key share");
        py::buffer_info info;
        const std::string_view v = view_of(update, info);
        const uint64_t* key = s.data();
        std::vector<std::string> parts;
        {
            py::gil_scoped_release nogil;
            parts = partial_decrypt_update(u8(v), v.size(), r, key, lead,
                                           FloodWidth{flood_hi, flood_lo},
                                           threads_or_default(threads));
        }
        py::list out;
        for (auto& p : parts) out.append(py::bytes(p));
        return out;
    }, "This party's packed partial decryption of each ciphertext of an aggregate (smudging "
       "noise of OpenFHE's size, flooding of variance flood_hi*2^64 + flood_lo when it is not 0).",
       py::arg("update"), py::arg("ring"), py::arg("s"), py::arg("lead"), py::arg("flood_hi"),
       py::arg("flood_lo"), py::arg("threads") = 0);
    m.def("ckks_fuse", [](const std::vector<std::vector<py::buffer>>& shares,
                          const py::tuple& ring, uint64_t n_values, unsigned threads) {
        const CkksRing r = ring_of(ring);
        std::vector<std::vector<std::pair<const uint8_t*, size_t>>> views;
        std::vector<py::buffer_info> held;  // keeps every buffer's view valid below
        size_t count = 0;
        for (const auto& party : shares) count += party.size();
        held.reserve(count);
        for (const auto& party : shares) {
            views.emplace_back();
            for (const auto& part : party) {
                held.emplace_back();
                const std::string_view v = view_of(part, held.back());
                views.back().emplace_back(u8(v), v.size());
            }
        }
        F64 out(static_cast<py::ssize_t>(n_values));
        double* o = out.mutable_data();
        py::gil_scoped_release nogil;
        fuse_partials(views, r, threads_or_default(threads), o, n_values);
        return out;
    }, "Fuses packed partial decryptions (shares[party][ciphertext], bytes-like) into the "
       "decoded values.",
       py::arg("shares"), py::arg("ring"), py::arg("n_values"), py::arg("threads") = 0);
    m.def("ckks_encrypt", [](const py::dict& header, const py::tuple& ring, const F64& values,
                             std::optional<U64> s, std::optional<U64> a,
                             std::optional<py::bytes> a_key, std::optional<py::bytes> seed,
                             std::optional<U64> p0, std::optional<U64> p1, unsigned threads) {
        const CkksRing r = ring_of(ring);
        const UpdateHeader h = header_from_pydict(header);
        std::string seed_bytes, a_key_bytes;
        if (h.seeded()) {
            if (!s || !(a || a_key) || !seed)
                throw py::value_error("ckks_encrypt: seeded needs s, a (or its key) and seed");
            if (a_key) {
                a_key_bytes = *a_key;
                if (a_key_bytes.size() != 32)
                    throw py::value_error("ckks_encrypt: the stream key of a must be 32 bytes");
            }
            check_key(*s, r, "ckks_encrypt: the secret key");
            seed_bytes = *seed;
            if (seed_bytes.size() != kSeedSize)
                throw py::value_error("ckks_encrypt: the seed must be 32 bytes");
            if (a && static_cast<uint64_t>(a->size()) != h.n_ciphertexts * r.towers() * r.ring_dim)
                throw py::value_error("ckks_encrypt: a needs n_ciphertexts * towers * ring_dim "
                                      "residues");
        } else {
            if (!p0 || !p1) throw py::value_error("ckks_encrypt: public-key needs p0 and p1");
            check_key(*p0, r, "ckks_encrypt: p0");
            check_key(*p1, r, "ckks_encrypt: p1");
        }
        const double* v = values.data();
        const size_t n = static_cast<size_t>(values.size());
        const uint64_t* sp = s ? s->data() : nullptr;
        const uint64_t* ap = a ? a->data() : nullptr;
        const uint64_t* p0p = p0 ? p0->data() : nullptr;
        const uint64_t* p1p = p1 ? p1->data() : nullptr;
        std::string out;
        {
            py::gil_scoped_release nogil;
            out = encrypt_update(h, r, v, n, sp, ap,
                                 a_key ? u8(a_key_bytes) : nullptr,
                                 reinterpret_cast<const uint8_t*>(seed_bytes.data()), p0p, p1p,
                                 threads_or_default(threads));
        }
        py::bytes result(out);
        secure_wipe(&out[0], out.size());  // ciphertext only, but no need to keep a copy
        return result;
    }, "Encrypts a packed buffer into a whole update: seeded secret-key encryption (s, a, "
       "seed) or public-key encryption (p0, p1).",
       py::arg("header"), py::arg("ring"), py::arg("values"), py::arg("s") = py::none(),
       py::arg("a") = py::none(), py::arg("a_key") = py::none(), py::arg("seed") = py::none(),
       py::arg("p0") = py::none(),
       py::arg("p1") = py::none(), py::arg("threads") = 0);
    m.def("ckks_sample_error", [](uint64_t n) {
        I64 out(static_cast<py::ssize_t>(n));
        int64_t* o = out.mutable_data();
        py::gil_scoped_release nogil;
        sample_error(o, n);
        return out;
    }, "n samples of the encryption error (discrete Gaussian, sigma 3.19).");
    py::list levels;
    for (const auto& level : kSmudgingLevels) levels.append(py::make_tuple(level[0], level[1]));
    m.attr("SMUDGING_LEVELS") = levels;
    m.attr("SMUDGING_BASE_DIVISOR") = kSmudgingBaseDivisor;
    m.attr("SMUDGING_EPS_BITS") = kSmudgingEpsBits;
    m.def("smudging_sample", [](uint64_t n, bool base) {
        I64 out(static_cast<py::ssize_t>(n));
        int64_t* o = out.mutable_data();
        py::gil_scoped_release nogil;
        FastRandom rng;
        if (base)
            sample_smudging_base(rng, o, n);
        else
            sample_smudging(rng, o, n);
        return out;
    }, "n samples of the smudging noise (csrc/smudging.hpp: N_Z(0, 2^40) by convolution) or, "
       "with base=True, of its base Gaussian D_{Z, sigma0}, sigma0^2 = 2^40 / "
       "SMUDGING_BASE_DIVISOR.", py::arg("n"), py::arg("base") = false);
    m.def("smudging_base_from_words", [](const U64& words, const U64& extra) {
        I64 out(words.size());
        smudging_base_from_words(words.data(), static_cast<size_t>(words.size()), extra.data(),
                                 static_cast<size_t>(extra.size()), out.mutable_data());
        return out;
    }, "Base draws from the given uniform words as one block, extra giving in order the bits "
       "each settled tie draws (for the tests).", py::arg("words"), py::arg("extra"));
    m.def("smudging_table", []() {
        U64 hi(kSmudgingTable), lo(kSmudgingTable);
        smudging_table(hi.mutable_data(), lo.mutable_data());
        return py::make_tuple(hi, lo);
    }, "The base table's thresholds (hi, lo): P(|y| <= k) ~ (hi[k] * 2^63 + lo[k]) / 2^126.");
    m.def("ckks_sample_ternary", [](uint64_t n) {
        I64 out(static_cast<py::ssize_t>(n));
        int64_t* o = out.mutable_data();
        py::gil_scoped_release nogil;
        sample_ternary(o, n);
        return out;
    }, "n samples uniform in {-1, 0, 1}.");
}
