// pybind11 binding of the Shamir key sharing of threshold mode (csrc/shamir.cpp).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>

#include "secure_wipe.hpp"
#include "shamir.hpp"

namespace py = pybind11;

void bind_shamir(py::module_& m) {
    using namespace fedshield;
    using U64 = py::array_t<uint64_t, py::array::c_style>;

    py::register_exception_translator([](std::exception_ptr p) {
        try {
            if (p) std::rethrow_exception(p);
        } catch (const ShamirInputError& e) {
            py::object errors = py::module_::import("fedshield.errors");
            PyErr_SetString(errors.attr("ParameterError").ptr(), e.what());
        }
    });

    m.def("locate_key_residues", [](const py::bytes& key, uint64_t ring_dim,
                                    const py::object& moduli) -> py::object {
        std::string_view v = key;
        const bool one = py::isinstance<py::int_>(moduli);
        const std::vector<uint64_t> qs =
            one ? std::vector<uint64_t>{moduli.cast<uint64_t>()} : moduli.cast<std::vector<uint64_t>>();
        std::vector<uint64_t> found = locate_key_residues(
            reinterpret_cast<const uint8_t*>(v.data()), v.size(), ring_dim, qs);
        if (one) return py::int_(found[0]);
        return py::cast(found);
    }, "Offset(s) of the residue array(s) in a serialized OpenFHE secret key: an int for one "
       "modulus, a list (one per tower) for a list of moduli.");
    m.def("shamir_split", [](const U64& secret, uint64_t modulus, unsigned threshold,
                             const std::vector<uint64_t>& xs) {
        std::vector<std::vector<uint64_t>> shares;
        WipeOnExit<std::vector<uint64_t>> wipe_shares(shares);
        {
            py::gil_scoped_release nogil;
            shares = shamir_split(secret.data(), static_cast<size_t>(secret.size()), modulus,
                                  threshold, xs);
        }
        py::list out;
        for (auto& s : shares) {
            U64 a(static_cast<py::ssize_t>(s.size()));
            std::memcpy(a.mutable_data(), s.data(), s.size() * 8);
            out.append(a);
        }
        return out;
    }, "Shamir shares mod q of a residue vector at the points xs (fresh getrandom coefficients).");
    m.def("lagrange_at_zero", &lagrange_at_zero,
          "Lagrange coefficient at 0 of xs[index] over xs, mod a prime q.");
    m.def("cover_absent", [](const U64& own, const std::vector<U64>& shares, uint64_t coefficient,
                             uint64_t modulus) {
        const size_t n = static_cast<size_t>(own.size());
        std::vector<const uint64_t*> ptrs;
        for (const auto& s : shares) {
            if (static_cast<size_t>(s.size()) != n)
                throw py::value_error("cover_absent: every share needs " + std::to_string(n) +
                                      " residues");
            ptrs.push_back(s.data());
        }
        U64 out(static_cast<py::ssize_t>(n));
        uint64_t* dst = out.mutable_data();
        {
            py::gil_scoped_release nogil;
            cover_absent(own.data(), ptrs, n, coefficient, modulus, dst);
        }
        return out;
    }, "own + coefficient * sum(shares) mod q, residue-wise.");
}
