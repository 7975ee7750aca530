// A Python buffer argument as bytes, for the pybind11 bindings (bind_*.cpp).
#pragma once
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string_view>

namespace fedshield {

// The bytes of a contiguous one-dimensional buffer (ValueError otherwise); `info` keeps the
// buffer alive while the view is in use.
inline std::string_view buffer_view(const pybind11::buffer& b, pybind11::buffer_info& info) {
    info = b.request();
    if (info.ndim > 1 || (info.ndim == 1 && info.strides[0] != info.itemsize))
        throw pybind11::value_error("expected a contiguous one-dimensional buffer");
    return {static_cast<const char*>(info.ptr), static_cast<size_t>(info.size * info.itemsize)};
}

inline const uint8_t* bytes_ptr(std::string_view v) {
    return reinterpret_cast<const uint8_t*>(v.data());
}

}  // namespace fedshield
