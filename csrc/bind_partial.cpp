// pybind11 binding of the partial-decryption codec of threshold mode (csrc/partial_codec.cpp).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <string_view>

#include "partial_codec.hpp"
#include "py_buffer.hpp"

namespace py = pybind11;

namespace {

using namespace fedshield;

// A partial-decryption layout as a flat tuple of 2 + 2T ints: (ring_dim, q_0..q_{T-1}, the
// offsets of towers 0..T-1, total_size).
CiphertextLayout partial_layout_from_tuple(const py::tuple& t) {
    const size_t len = t.size();
    if (len < 4 || len % 2 != 0 || (len - 2) / 2 > kMaxTowers)
        throw py::value_error("a partial-decryption layout is a tuple of 2 + 2T ints (T towers)");
    const size_t towers = (len - 2) / 2;
    CiphertextLayout l;
    l.ring_dim = t[0].cast<uint64_t>();
    for (size_t i = 0; i < towers; ++i) l.moduli.push_back(t[1 + i].cast<uint64_t>());
    for (size_t i = 0; i < towers; ++i) l.offsets.push_back(t[1 + towers + i].cast<uint64_t>());
    l.total_size = t[len - 1].cast<uint64_t>();
    return l;
}

}  // namespace

void bind_partial(py::module_& m) {
    m.def("partial_bytes", &partial_bytes,
          "Bytes of one packed partial decryption for ring_dim and the towers' moduli.");
    m.def("encode_partial", [](const py::buffer& blob, uint64_t ring_dim,
                               const std::vector<uint64_t>& moduli) {
        py::buffer_info info;
        const std::string_view v = buffer_view(blob, info);
        std::string out;
        {
            py::gil_scoped_release nogil;
            out = encode_partial(bytes_ptr(v), v.size(), ring_dim, moduli);
        }
        return py::bytes(out);
    }, "The residues of a serialized OpenFHE partial decryption, bit-packed per tower.");
    m.def("check_partial", [](const py::buffer& packed, uint64_t ring_dim,
                              const std::vector<uint64_t>& moduli) {
        py::buffer_info info;
        const std::string_view v = buffer_view(packed, info);
        py::gil_scoped_release nogil;
        decode_partial(bytes_ptr(v), v.size(), ring_dim, moduli);
    }, "Validates a packed partial decryption (size, every residue below its modulus).");
    m.def("rebuild_partial", [](const py::buffer& packed, const py::bytes& tmpl,
                                const py::tuple& layout) {
        py::buffer_info info;
        const std::string_view v = buffer_view(packed, info);
        const std::string_view t = tmpl;
        const CiphertextLayout l = partial_layout_from_tuple(layout);
        std::string out;
        {
            py::gil_scoped_release nogil;
            out = rebuild_partial(bytes_ptr(v), v.size(), bytes_ptr(t), t.size(), l);
        }
        return py::bytes(out);
    }, "Validates a packed partial decryption and writes its residues into a copy of the "
       "template at the layout's offsets (2 + 2T ints: ring_dim, moduli, offsets, size).");
}
