// pybind11 binding of the key-material codec of key set-up (csrc/key_codec.cpp).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#include <string>
#include <string_view>

#include "key_codec.hpp"
#include "py_buffer.hpp"
#include "secure_wipe.hpp"

namespace py = pybind11;

namespace {

using namespace fedshield;

// A key layout as a flat tuple of 2 + T + E*T ints: (ring_dim, q_0..q_{T-1}, the offsets of
// the E*T residue arrays, total_size).
CiphertextLayout key_layout_from_tuple(const py::tuple& t, size_t elements) {
    const size_t len = t.size();
    if (elements == 0 || elements > kMaxPolys || len < 2 + 1 + elements ||
        (len - 2) % (1 + elements) != 0 || (len - 2) / (1 + elements) > kMaxTowers)
        throw py::value_error("a key layout is a tuple of 2 + T + E*T ints (T towers, "
                              "E polynomials)");
    const size_t towers = (len - 2) / (1 + elements);
    CiphertextLayout l;
    l.ring_dim = t[0].cast<uint64_t>();
    for (size_t i = 0; i < towers; ++i) l.moduli.push_back(t[1 + i].cast<uint64_t>());
    for (size_t i = 0; i < elements * towers; ++i)
        l.offsets.push_back(t[1 + towers + i].cast<uint64_t>());
    l.total_size = t[len - 1].cast<uint64_t>();
    return l;
}

// The string's bytes handed to Python as a bytearray (which the caller can wipe), the
// string itself wiped: it may hold a secret key.
py::bytearray to_bytearray(std::string& s) {
    py::bytearray out(s.data(), s.size());
    secure_wipe(&s[0], s.size());
    return out;
}

}  // namespace

void bind_key_codec(py::module_& m) {
    m.def("key_polys_bytes", &packed_polys_bytes, py::arg("ring_dim"), py::arg("moduli"),
          py::arg("elements"),
          "Bytes of E packed polynomials for ring_dim and the towers' moduli.");
    m.def("encode_key_polys", [](const py::buffer& blob, uint64_t ring_dim,
                                 const std::vector<uint64_t>& moduli, size_t elements) {
        py::buffer_info info;
        const std::string_view v = buffer_view(blob, info);
        std::string out;
        {
            py::gil_scoped_release nogil;
            out = encode_polys(bytes_ptr(v), v.size(), ring_dim, moduli, elements, "key");
        }
        return to_bytearray(out);
    }, "The E * T residue arrays of a serialized OpenFHE key, bit-packed per tower "
       "(a bytearray: it may hold a secret key).");
    m.def("decode_key_polys", [](const py::buffer& packed, uint64_t ring_dim,
                                 const std::vector<uint64_t>& moduli, size_t elements,
                                 const std::string& what) {
        py::buffer_info info;
        const std::string_view v = buffer_view(packed, info);
        std::vector<uint64_t> residues;
        {
            py::gil_scoped_release nogil;
            residues = decode_polys(bytes_ptr(v), v.size(), ring_dim, moduli, elements,
                                    what.c_str());
        }
        py::array_t<uint64_t> out(static_cast<py::ssize_t>(residues.size()));
        std::memcpy(out.mutable_data(), residues.data(), residues.size() * 8);
        secure_wipe(residues);
        return out;
    }, py::arg("packed"), py::arg("ring_dim"), py::arg("moduli"), py::arg("elements"),
       py::arg("what") = "key",
       "Validates E packed polynomials (exact size, every residue below its modulus) and "
       "returns their E * T * N residues (uint64, polynomial-major then tower-major).");
    m.def("pack_key_polys", [](const py::array_t<uint64_t, py::array::c_style>& residues,
                               uint64_t ring_dim, const std::vector<uint64_t>& moduli,
                               size_t elements, const std::string& what) {
        const uint64_t* r = residues.data();
        const size_t count = static_cast<size_t>(residues.size());
        std::string out;
        {
            py::gil_scoped_release nogil;
            out = pack_polys(r, count, ring_dim, moduli, elements, what.c_str());
        }
        return to_bytearray(out);
    }, py::arg("residues"), py::arg("ring_dim"), py::arg("moduli"), py::arg("elements"),
       py::arg("what") = "key",
       "E * T * N residues (each below its tower's modulus) bit-packed as decode_key_polys "
       "reads them (a bytearray: they may be a secret key's).");
    m.def("sum_key_polys", [](const std::vector<py::bytes>& runs, uint64_t ring_dim,
                              const std::vector<uint64_t>& moduli, size_t elements,
                              const std::string& what) {
        std::vector<std::pair<const uint8_t*, size_t>> views;
        for (const auto& run : runs) {
            char* p = nullptr;
            Py_ssize_t len = 0;
            if (PyBytes_AsStringAndSize(run.ptr(), &p, &len) != 0) throw py::error_already_set();
            views.emplace_back(reinterpret_cast<const uint8_t*>(p), static_cast<size_t>(len));
        }
        std::string out;
        {
            py::gil_scoped_release nogil;
            out = sum_polys(views, ring_dim, moduli, elements, what.c_str());
        }
        return py::bytes(out);
    }, py::arg("runs"), py::arg("ring_dim"), py::arg("moduli"), py::arg("elements"),
       py::arg("what") = "key",
       "The sum mod q of packed runs of E polynomials (each validated), packed again.");
    m.def("rebuild_key", [](const py::buffer& packed, const py::bytes& tmpl,
                            const py::tuple& layout, size_t elements, const std::string& what) {
        py::buffer_info info;
        const std::string_view v = buffer_view(packed, info);
        const std::string_view t = tmpl;
        const CiphertextLayout l = key_layout_from_tuple(layout, elements);
        std::string out;
        {
            py::gil_scoped_release nogil;
            out = rebuild_polys(bytes_ptr(v), v.size(), bytes_ptr(t), t.size(), l, elements,
                                what.c_str());
        }
        return to_bytearray(out);
    }, py::arg("packed"), py::arg("template"), py::arg("layout"), py::arg("elements"),
       py::arg("what") = "key",
       "Validates E packed polynomials and writes their residues into a copy of the template "
       "at the layout's offsets (2 + T + E*T ints: ring_dim, moduli, offsets, size); a "
       "bytearray.");
}
