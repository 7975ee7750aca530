// pybind11 binding of the CPU importance scoring + pruning (csrc/importance.cpp).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "importance.hpp"

namespace py = pybind11;

void bind_importance(py::module_& m) {
    using namespace fedshield;
    using F32 = py::array_t<float, py::array::c_style | py::array::forcecast>;

    py::register_exception_translator([](std::exception_ptr p) {
        try {
            if (p) std::rethrow_exception(p);
        } catch (const ImportanceInputError& e) {
            py::object errors = py::module_::import("fedshield.base.errors");
            PyErr_SetString(errors.attr("ParameterError").ptr(), e.what());
        }
    });

    m.def("importance_mask", [](const std::vector<F32>& values, const std::vector<F32>& others,
                                int criterion, const std::vector<uint64_t>& n_prune,
                                bool global_scope, bool compact,
                                const std::vector<std::string>& names,
                                const std::string& other_label, unsigned threads) {
        if (criterion < 0 || criterion > 2)
            throw py::value_error("criterion must be 0 (l1), 1 (delta) or 2 (taylor)");
        if (!others.empty() && others.size() != values.size())
            throw py::value_error("importance_mask: one other tensor per tensor, or none");
        std::vector<ImportanceTensor> tensors(values.size());
        uint64_t total = 0, pruned = 0;
        for (size_t i = 0; i < values.size(); ++i) {
            tensors[i].values = values[i].data();
            tensors[i].numel = static_cast<uint64_t>(values[i].size());
            if (!others.empty()) {
                if (others[i].size() != values[i].size())
                    throw ImportanceInputError(other_label + "['" +
                                               (i < names.size() ? names[i] : std::to_string(i)) +
                                               "'] has a different size than its tensor");
                tensors[i].other = others[i].data();
            }
            total += tensors[i].numel;
        }
        for (uint64_t k : n_prune) pruned += k;
        const uint64_t kept = pruned <= total ? total - pruned : 0;
        py::array_t<uint8_t> mask(static_cast<py::ssize_t>(total));
        py::array_t<float> kept_values(static_cast<py::ssize_t>(compact ? kept : 0));
        py::array_t<int64_t> kept_indices(static_cast<py::ssize_t>(compact ? kept : 0));
        ImportanceOutputs out;
        out.mask = mask.mutable_data();
        if (compact) {
            out.kept_values = kept_values.mutable_data();
            out.kept_indices = kept_indices.mutable_data();
        }
        {
            py::gil_scoped_release nogil;
            importance_mask(tensors, static_cast<Criterion>(criterion), n_prune, global_scope, out,
                            threads, names, other_label);
        }
        return py::make_tuple(mask, kept_values, kept_indices);
    }, py::arg("values"), py::arg("others"), py::arg("criterion"), py::arg("n_prune"),
       py::arg("global_scope"), py::arg("compact"), py::arg("names"), py::arg("other_label"),
       py::arg("threads") = 0,
       "Importance scores + per-segment pruning mask (uint8, 1 = kept) over float32 tensors; "
       "with compact, also the kept values and their flat indices.");
}
