// pybind11 binding of the exact discrete Gaussian sampler of DP noise (csrc/discrete_gaussian.cpp).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "discrete_gaussian.hpp"
#include "parallel.hpp"

namespace py = pybind11;

namespace {

// The arrays are taken as plain py::array and checked, not converted: array_t's caster would
// silently copy a non-contiguous or other-dtype array (noise added to a temporary is lost), and
// a misaligned one (a view at an odd offset) cannot be read through int64_t*.
void check_int64(const py::array& values, const char* what) {
    if (!values.dtype().is(py::dtype::of<int64_t>()) ||
        !(values.flags() & py::array::c_style) ||
        !(values.flags() & py::detail::npy_api::NPY_ARRAY_ALIGNED_))
        throw py::value_error(std::string(what) + ": values must be an aligned, C-contiguous "
                              "int64 array");
}

}  // namespace

void bind_dp(py::module_& m) {
    using namespace fedshield;

    m.attr("MAX_NOISE_SIGMA2") = kMaxSigma2;
    m.def("add_discrete_gaussian", [](py::array values, uint64_t sigma2, unsigned threads) {
        check_int64(values, "add_discrete_gaussian");
        if (!values.writeable())
            throw py::value_error("add_discrete_gaussian: values must be writeable");
        auto* data = static_cast<int64_t*>(values.mutable_data());
        const auto n = static_cast<uint64_t>(values.size());
        py::gil_scoped_release nogil;
        add_discrete_gaussian(data, n, sigma2, threads ? threads : default_threads());
    }, "Adds exact N_Z(0, sigma2) samples (kernel CSPRNG, integer arithmetic) in place.");
    m.def("squared_norm", [](py::array values) {
        check_int64(values, "squared_norm");
        const auto* data = static_cast<const int64_t*>(values.data());
        unsigned __int128 s;
        {
            py::gil_scoped_release nogil;
            s = squared_norm(data, static_cast<uint64_t>(values.size()));
        }
        py::int_ hi(static_cast<uint64_t>(s >> 64)), lo(static_cast<uint64_t>(s));
        return hi.attr("__lshift__")(64).attr("__or__")(lo);
    }, "Exact sum of squares of int64 values (a Python int; saturates at 2**128 - 1).");
}
