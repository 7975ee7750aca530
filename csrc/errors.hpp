// Distinct error types of the native core; bindings.cpp maps each to its Python exception.
#pragma once
#include <stdexcept>
#include <string>

namespace fedshield {

// Bytes that are not a well-formed fedshield object (truncated, corrupted, tampered).
struct InvalidUpdateError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

// Well-formed, but made for another context, layout, mask or round.
struct IncompatibleUpdateError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

// A value that would not fit the CKKS headroom (or is NaN/Inf): rejected, never wrapped.
struct ValueRangeError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

// Arguments out of a native routine's range (a noise variance, a value to noise): the caller's
// parameters, not hostile bytes.
struct ParameterInputError : std::invalid_argument {
    using std::invalid_argument::invalid_argument;
};

// An object that is not thread-safe (the Aggregator) called from a second thread while one
// call is still running: refused, never interleaved.
struct ConcurrentUseError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

}  // namespace fedshield
