// pybind11 binding of the Shamir key sharing of threshold mode (csrc/shamir.cpp).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "secure_wipe.hpp"
#include "shamir.hpp"

namespace py = pybind11;

namespace {

using U64 = py::array_t<uint64_t, py::array::c_style>;

// The values of `a` as an aligned uint64_t pointer: its own data when aligned, else a copy in
// `held`. Key residues reach here as numpy views at any byte offset of a serialized key
// (contiguous but misaligned), and reading those through uint64_t* is undefined behaviour
// (UBSan: "load of misaligned address").
const uint64_t* aligned_values(const U64& a, std::vector<uint64_t>& held) {
    const void* p = a.data();
    if (reinterpret_cast<uintptr_t>(p) % alignof(uint64_t) == 0)
        return static_cast<const uint64_t*>(p);
    held.resize(static_cast<size_t>(a.size()));
    std::memcpy(held.data(), p, held.size() * sizeof(uint64_t));
    return held.data();
}

}  // namespace

void bind_shamir(py::module_& m) {
    using namespace fedshield;

    py::register_exception_translator([](std::exception_ptr p) {
        try {
            if (p) std::rethrow_exception(p);
        } catch (const ShamirInputError& e) {
            py::object errors = py::module_::import("fedshield.base.errors");
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
        std::vector<uint64_t> held;
        WipeOnExit<uint64_t> wipe_held(held);
        const uint64_t* values = aligned_values(secret, held);
        {
            py::gil_scoped_release nogil;
            shares = shamir_split(values, static_cast<size_t>(secret.size()), modulus,
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
        std::vector<std::vector<uint64_t>> held(shares.size() + 1);
        WipeOnExit<std::vector<uint64_t>> wipe_held(held);
        std::vector<const uint64_t*> ptrs;
        for (size_t k = 0; k < shares.size(); ++k) {
            if (static_cast<size_t>(shares[k].size()) != n)
                throw py::value_error("cover_absent: every share needs " + std::to_string(n) +
                                      " residues");
            ptrs.push_back(aligned_values(shares[k], held[k]));
        }
        const uint64_t* own_values = aligned_values(own, held.back());
        U64 out(static_cast<py::ssize_t>(n));
        uint64_t* dst = out.mutable_data();
        {
            py::gil_scoped_release nogil;
            cover_absent(own_values, ptrs, n, coefficient, modulus, dst);
        }
        return out;
    }, "own + coefficient * sum(shares) mod q, residue-wise.");
}
