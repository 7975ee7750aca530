// pybind11 binding of fedshield's own CKKS arithmetic (csrc/ckks.cpp). Every call releases the
// GIL for its arithmetic and runs on the native thread pool (threads = 0: default_threads()).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "ckks.hpp"
#include "parallel.hpp"
#include "secure_wipe.hpp"

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
    m.def("ckks_decrypt", [](const py::buffer& update, const py::tuple& ring, const U64& s,
                             std::optional<U64> c1, uint64_t flood_hi, uint64_t flood_lo,
                             uint64_t n_values, unsigned threads) {
        const CkksRing r = ring_of(ring);
        check_key(s, r, "ckks_decrypt: the secret key");
        py::buffer_info info;
        const std::string_view v = view_of(update, info);
        F64 out(static_cast<py::ssize_t>(n_values));
        const uint64_t* c1_data = c1 ? c1->data() : nullptr;
        const size_t c1_len = c1 ? static_cast<size_t>(c1->size()) : 0;
        const uint64_t* key = s.data();
        double* o = out.mutable_data();
        py::gil_scoped_release nogil;
        decrypt_update(u8(v), v.size(), r, key, c1_data, c1_len, FloodWidth{flood_hi, flood_lo},
                       threads_or_default(threads), o, n_values);
        return out;
    }, "Decrypts every ciphertext of an update with the secret key (seeded: c1 = the sum of "
       "its seeds' expansions); n_values = n_ciphertexts * values per ciphertext.",
       py::arg("update"), py::arg("ring"), py::arg("s"), py::arg("c1"), py::arg("flood_hi"),
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
       "noise of OpenFHE's size, flooding when flood_hi/lo != 0).",
       py::arg("update"), py::arg("ring"), py::arg("s"), py::arg("lead"), py::arg("flood_hi"),
       py::arg("flood_lo"), py::arg("threads") = 0);
    m.def("ckks_fuse", [](const std::vector<std::vector<py::bytes>>& shares,
                          const py::tuple& ring, uint64_t n_values, unsigned threads) {
        const CkksRing r = ring_of(ring);
        std::vector<std::vector<std::pair<const uint8_t*, size_t>>> views;
        for (const auto& party : shares) {
            views.emplace_back();
            for (const auto& part : party) {
                char* p = nullptr;
                Py_ssize_t len = 0;
                if (PyBytes_AsStringAndSize(part.ptr(), &p, &len) != 0) throw py::error_already_set();
                views.back().emplace_back(reinterpret_cast<const uint8_t*>(p),
                                          static_cast<size_t>(len));
            }
        }
        F64 out(static_cast<py::ssize_t>(n_values));
        double* o = out.mutable_data();
        py::gil_scoped_release nogil;
        fuse_partials(views, r, threads_or_default(threads), o, n_values);
        return out;
    }, "Fuses packed partial decryptions (shares[party][ciphertext]) into the decoded values.",
       py::arg("shares"), py::arg("ring"), py::arg("n_values"), py::arg("threads") = 0);
    m.def("ckks_encrypt", [](const py::dict& header, const py::tuple& ring, const F64& values,
                             std::optional<U64> s, std::optional<U64> a,
                             std::optional<py::bytes> seed, std::optional<U64> p0,
                             std::optional<U64> p1, unsigned threads) {
        const CkksRing r = ring_of(ring);
        const UpdateHeader h = header_from_pydict(header);
        std::string seed_bytes;
        if (h.seeded()) {
            if (!s || !a || !seed) throw py::value_error("ckks_encrypt: seeded needs s, a and seed");
            check_key(*s, r, "ckks_encrypt: the secret key");
            seed_bytes = *seed;
            if (seed_bytes.size() != kSeedSize)
                throw py::value_error("ckks_encrypt: the seed must be 32 bytes");
            if (static_cast<uint64_t>(a->size()) != h.n_ciphertexts * r.towers() * r.ring_dim)
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
                                 reinterpret_cast<const uint8_t*>(seed_bytes.data()), p0p, p1p,
                                 threads_or_default(threads));
        }
        py::bytes result(out);
        secure_wipe(&out[0], out.size());  // ciphertext only, but no need to keep a copy
        return result;
    }, "Encrypts a packed buffer into a whole update: seeded secret-key encryption (s, a, "
       "seed) or public-key encryption (p0, p1).",
       py::arg("header"), py::arg("ring"), py::arg("values"), py::arg("s") = py::none(),
       py::arg("a") = py::none(), py::arg("seed") = py::none(), py::arg("p0") = py::none(),
       py::arg("p1") = py::none(), py::arg("threads") = 0);
    m.def("ckks_sample_error", [](uint64_t n) {
        I64 out(static_cast<py::ssize_t>(n));
        int64_t* o = out.mutable_data();
        py::gil_scoped_release nogil;
        sample_error(o, n);
        return out;
    }, "n samples of the encryption error (discrete Gaussian, sigma 3.19).");
    m.def("ckks_sample_ternary", [](uint64_t n) {
        I64 out(static_cast<py::ssize_t>(n));
        int64_t* o = out.mutable_data();
        py::gil_scoped_release nogil;
        sample_ternary(o, n);
        return out;
    }, "n samples uniform in {-1, 0, 1}.");
}
