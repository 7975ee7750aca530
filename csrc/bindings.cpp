// pybind11 bindings of the native core (module fedshield.native). The core itself does not
// depend on pybind11; each bound area has its own bind_*() below.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <atomic>
#include <cstring>
#include <optional>
#include <utility>

#include "aggregate.hpp"
#include "bitpack.hpp"
#include "checksum.hpp"
#include "ciphertext_layout.hpp"
#include "errors.hpp"
#include "flood.hpp"
#include "packing.hpp"
#include "modarith.hpp"
#include "parallel.hpp"
#include "secure_wipe.hpp"
#include "seeded.hpp"
#include "update_codec.hpp"
#include "wire.hpp"

namespace py = pybind11;
using namespace fedshield;

void bind_importance(py::module_& m);  // bind_importance.cpp
void bind_shamir(py::module_& m);      // bind_shamir.cpp
void bind_partial(py::module_& m);     // bind_partial.cpp
void bind_key_codec(py::module_& m);   // bind_key_codec.cpp
void bind_dp(py::module_& m);          // bind_dp.cpp
void bind_ckks(py::module_& m);        // bind_ckks.cpp

namespace {

struct BufferBytes {
    py::buffer_info info;
    const uint8_t* data() const { return static_cast<const uint8_t*>(info.ptr); }
    size_t size() const { return static_cast<size_t>(info.size * info.itemsize); }
};

BufferBytes bytes_of(const py::buffer& b) {
    py::buffer_info info = b.request();
    if (info.ndim >= 1) {
        bool contiguous = true;
        py::ssize_t expect = info.itemsize;
        for (py::ssize_t d = info.ndim - 1; d >= 0; --d) {
            if (info.strides[d] != expect) contiguous = false;
            expect *= info.shape[d];
        }
        if (!contiguous) throw py::value_error("expected a contiguous buffer");
    }
    return BufferBytes{std::move(info)};
}

using U64 = py::array_t<uint64_t, py::array::c_style>;

Fingerprint fingerprint_of(const py::bytes& b, const char* name) {
    std::string s = b;
    if (s.size() != 32)
        throw py::value_error(std::string(name) + " must be 32 bytes, got " +
                              std::to_string(s.size()));
    Fingerprint fp;
    std::memcpy(fp.data(), s.data(), 32);
    return fp;
}

// A bytes object of n bytes filled by fill(ptr) with the GIL released: the result is written
// once, in place, instead of built in a std::string and copied into Python.
template <class F>
py::bytes filled_bytes(size_t n, F fill) {
    PyObject* obj = PyBytes_FromStringAndSize(nullptr, static_cast<Py_ssize_t>(n));
    if (obj == nullptr) throw py::error_already_set();
    auto result = py::reinterpret_steal<py::bytes>(obj);
    auto* out = reinterpret_cast<uint8_t*>(PyBytes_AS_STRING(obj));
    {
        py::gil_scoped_release nogil;
        fill(out);
    }
    return result;
}

// One modulus (an int) or the list of RNS tower moduli.
std::vector<uint64_t> moduli_of(const py::handle& obj) {
    if (py::isinstance<py::int_>(obj)) return {obj.cast<uint64_t>()};
    return obj.cast<std::vector<uint64_t>>();
}

py::bytes fp_bytes(const Fingerprint& fp) {
    return py::bytes(reinterpret_cast<const char*>(fp.data()), fp.size());
}

py::dict header_to_dict(const UpdateHeader& h) {
    py::dict d;
    d["kind"] = static_cast<unsigned>(h.kind);
    d["n_summed"] = h.n_summed;
    d["context_fp"] = fp_bytes(h.context_fp);
    d["layout_fp"] = fp_bytes(h.layout_fp);
    d["mask_fp"] = fp_bytes(h.mask_fp);
    d["round"] = h.round;
    d["n_values"] = h.n_values;
    d["ring_dim"] = h.ring_dim;
    d["n_ciphertexts"] = h.n_ciphertexts;
    d["modulus"] = h.moduli.at(0);
    d["moduli"] = py::tuple(py::cast(h.moduli));
    d["n_towers"] = h.moduli.size();
    d["residue_bits"] = h.residue_bits;
    d["packing"] = static_cast<unsigned>(h.packing);
    d["weight_bound"] = h.weight_bound;
    d["payload_len"] = h.payload_len;
    d["elements"] = h.elements;
    return d;
}

UpdateHeader header_from_dict(const py::dict& d) {
    UpdateHeader h;
    h.kind = static_cast<UpdateKind>(d["kind"].cast<uint16_t>());
    h.n_summed = d["n_summed"].cast<uint32_t>();
    h.context_fp = fingerprint_of(d["context_fp"].cast<py::bytes>(), "context_fp");
    h.layout_fp = fingerprint_of(d["layout_fp"].cast<py::bytes>(), "layout_fp");
    h.mask_fp = fingerprint_of(d["mask_fp"].cast<py::bytes>(), "mask_fp");
    h.round = d["round"].cast<uint64_t>();
    h.n_values = d["n_values"].cast<uint64_t>();
    h.ring_dim = d["ring_dim"].cast<uint32_t>();
    h.n_ciphertexts = d["n_ciphertexts"].cast<uint32_t>();
    h.moduli = d.contains("moduli") ? moduli_of(d["moduli"]) : moduli_of(d["modulus"]);
    if (d.contains("moduli") && d.contains("modulus") && !h.moduli.empty() &&
        d["modulus"].cast<uint64_t>() != h.moduli[0])
        throw py::value_error("header: modulus is not moduli[0]");
    h.residue_bits = static_cast<uint8_t>(residue_bits_of(h.moduli));
    h.packing = static_cast<Packing>(d["packing"].cast<uint8_t>());
    h.weight_bound = d["weight_bound"].cast<double>();
    h.elements = d.contains("elements") ? d["elements"].cast<uint8_t>() : uint8_t{2};
    h.payload_len = h.n_ciphertexts * h.ciphertext_bytes();
    return h;
}

// A ciphertext layout as a flat tuple of 2 + 3T ints: (ring_dim, q_0..q_{T-1}, the c0 offsets
// of towers 0..T-1, the c1 offsets, total_size). With one tower: (N, q, c0, c1, total).
CiphertextLayout layout_from_tuple(const py::tuple& t) {
    const size_t len = t.size();
    if (len < 5 || (len - 2) % 3 != 0 || (len - 2) / 3 > kMaxTowers)
        throw py::value_error("ciphertext layout must be a tuple of 2 + 3T ints (T towers)");
    const size_t towers = (len - 2) / 3;
    CiphertextLayout l;
    l.ring_dim = t[0].cast<uint64_t>();
    for (size_t i = 0; i < towers; ++i) l.moduli.push_back(t[1 + i].cast<uint64_t>());
    for (size_t k = 0; k < 2 * towers; ++k) l.offsets.push_back(t[1 + towers + k].cast<uint64_t>());
    l.total_size = t[len - 1].cast<uint64_t>();
    return l;
}

py::tuple layout_to_tuple(const CiphertextLayout& l) {
    py::list out;
    out.append(l.ring_dim);
    for (uint64_t q : l.moduli) out.append(q);
    for (uint64_t off : l.offsets) out.append(off);
    out.append(l.total_size);
    return py::tuple(out);
}

// C++ errors become the public Python errors of fedshield.base.errors (one hierarchy for users).
void bind_errors(py::module_&) {
    py::register_exception_translator([](std::exception_ptr p) {
        auto raise = [](const char* cls, const char* msg) {
            py::object errors = py::module_::import("fedshield.base.errors");
            PyErr_SetString(errors.attr(cls).ptr(), msg);
        };
        try {
            if (p) std::rethrow_exception(p);
        } catch (const InvalidUpdateError& e) {
            raise("InvalidUpdate", e.what());
        } catch (const IncompatibleUpdateError& e) {
            raise("IncompatibleUpdate", e.what());
        } catch (const ValueRangeError& e) {
            raise("HeadroomError", e.what());
        } catch (const ConcurrentUseError& e) {
            raise("ConcurrentUseError", e.what());
        } catch (const ParameterInputError& e) {
            raise("ParameterError", e.what());
        }
    });
}

void bind_wire(py::module_& m) {
    m.attr("HEADER_SIZE") = kHeaderSize;
    m.attr("CHECKSUM_SIZE") = kChecksumSize;
    m.attr("WIRE_VERSION") = kWireVersion;
    m.def("checksum64", [](const py::buffer& b) {
        auto v = bytes_of(b);
        py::gil_scoped_release nogil;
        return wire_checksum(v.data(), v.size(), default_threads());
    }, "The wire format's 64-bit corruption checksum of a byte buffer.");
    m.attr("SEED_SIZE") = kSeedSize;
    m.def("parse_update", [](const py::buffer& b) {
        auto v = bytes_of(b);
        UpdateHeader h;
        {
            py::gil_scoped_release nogil;
            h = parse_update(v.data(), v.size(), default_threads());
        }
        py::dict d = header_to_dict(h);
        py::list seeds;  // seeded updates: each summed client update's seed
        const uint8_t* s = v.data() + h.header_size() + h.payload_len;
        for (uint64_t i = 0; i < h.seeds_len() / kSeedSize; ++i)
            seeds.append(py::bytes(reinterpret_cast<const char*>(s + i * kSeedSize), kSeedSize));
        d["seeds"] = py::tuple(seeds);
        return d;
    }, "Validates a serialized update (every byte) and returns its header as a dict (with its "
       "seeds).");
    m.def("encode_update", [](const py::dict& header, const py::buffer& body) {
        UpdateHeader h = header_from_dict(header);
        auto v = bytes_of(body);
        if (v.size() != body_len(h))
            throw py::value_error("body has " + std::to_string(v.size()) + " bytes, expected " +
                                  std::to_string(body_len(h)) + " (payload, then seeds)");
        std::string out = encode_update(h, v.data(), default_threads());
        return py::bytes(out);
    }, "Serializes header + body (payload, then seeds) + checksum.");
}

void bind_ciphertexts(py::module_& m) {
    m.def("locate_residues", [](const py::buffer& ct, uint64_t ring_dim, const py::object& moduli) {
        auto v = bytes_of(ct);
        return layout_to_tuple(locate_residues(v.data(), v.size(), ring_dim, moduli_of(moduli)));
    }, "Finds the c0/c1 residue arrays (every RNS tower) in an OpenFHE BINARY ciphertext "
       "serialization; moduli: one int or the towers' list.");
    m.def("find_residue_arrays", [](const py::buffer& blob, uint64_t ring_dim,
                                    const py::object& moduli, size_t expected) {
        auto v = bytes_of(blob);
        return find_residue_arrays(v.data(), v.size(), ring_dim, moduli_of(moduli), "polynomial",
                                   expected);
    }, "Offsets of exactly `expected` residue arrays (cycling through the towers' moduli) in an "
       "OpenFHE BINARY serialization.");
    m.def("encode_ciphertexts", [](const py::dict& header, const std::vector<py::bytes>& cts,
                                   const py::tuple& layout, unsigned threads,
                                   std::optional<py::bytes> seed) {
        UpdateHeader h = header_from_dict(header);
        std::string seed_bytes = seed ? std::string(*seed) : std::string();
        if (h.seeded() != static_cast<bool>(seed) ||
            (seed && seed_bytes.size() != kSeedSize))
            throw py::value_error("encode_ciphertexts: a seeded header (elements 1) needs a " +
                                  std::to_string(kSeedSize) + "-byte seed, and only it");
        std::vector<std::string_view> held;
        std::vector<ByteView> views;
        for (const auto& c : cts) {
            std::string_view sv = c;
            held.push_back(sv);
            views.push_back({reinterpret_cast<const uint8_t*>(sv.data()), sv.size()});
        }
        const CiphertextLayout l = layout_from_tuple(layout);
        const UpdateHeader full = ciphertexts_header(h, views, l);
        const unsigned n_threads = threads ? threads : default_threads();
        return filled_bytes(update_size(full), [&](uint8_t* out) {
            encode_ciphertexts(full, views, l, n_threads, out,
                               reinterpret_cast<const uint8_t*>(seed_bytes.data()));
        });
    }, "Packs the residues of serialized ciphertexts into a wire update (seeded: c0 and the "
       "seed only).", py::arg("header"), py::arg("cts"), py::arg("layout"),
       py::arg("threads") = 0, py::arg("seed") = py::none());
    m.def("decode_ciphertexts", [](const py::buffer& update, const py::bytes& tmpl,
                                   const py::tuple& layout, unsigned threads,
                                   std::optional<U64> c1) {
        auto v = bytes_of(update);
        std::string_view t = tmpl;
        CiphertextLayout l = layout_from_tuple(layout);
        const uint64_t* c1_data = c1 ? c1->data() : nullptr;
        const size_t c1_len = c1 ? static_cast<size_t>(c1->size()) : 0;
        std::vector<std::string> cts;
        {
            py::gil_scoped_release nogil;
            cts = decode_ciphertexts(v.data(), v.size(), reinterpret_cast<const uint8_t*>(t.data()),
                                     t.size(), l, threads ? threads : default_threads(), c1_data,
                                     c1_len);
        }
        py::list out;
        for (auto& c : cts) out.append(py::bytes(c));
        return out;
    }, "Validates an update and rebuilds its serialized ciphertexts from a template (seeded: "
       "c1 from the given expansion, uint64[n_ciphertexts * towers * ring_dim]).",
       py::arg("update"), py::arg("template"), py::arg("layout"), py::arg("threads") = 0,
       py::arg("c1") = py::none());
}

void bind_seeded(py::module_& m) {
    m.def("sample_uniform", [](const py::buffer& stream, uint64_t q, uint64_t n,
                               std::optional<U64> accumulate) -> py::object {
        auto v = bytes_of(stream);
        if (v.size() % 8 != 0)
            throw py::value_error("sample_uniform: the stream has " + std::to_string(v.size()) +
                                  " bytes, not whole 8-byte words");
        U64 out(static_cast<py::ssize_t>(n));
        bool ok;
        {
            py::gil_scoped_release nogil;
            ok = sample_uniform(v.data(), v.size(), q, n, out.mutable_data());
        }
        if (!ok) return py::none();
        if (accumulate) {
            if (static_cast<uint64_t>(accumulate->size()) != n)
                throw py::value_error("sample_uniform: accumulate has the wrong size");
            uint64_t* acc = accumulate->mutable_data();
            if (any_not_below(acc, n, q))
                throw InvalidUpdateError("sample_uniform: accumulator residue not below q");
            add_mod(acc, out.data(), n, q);
            return *accumulate;
        }
        return out;
    }, "n residues uniform mod q by rejection sampling of the stream's 8-byte words (None if "
       "the stream runs out); with accumulate, adds them into it mod q instead (in place).",
       py::arg("stream"), py::arg("q"), py::arg("n"), py::arg("accumulate") = py::none());
    m.def("reseed_ciphertexts", [](const std::vector<py::bytearray>& cts, const py::tuple& layout,
                                   const U64& a, const U64& s, unsigned threads) {
        const CiphertextLayout l = layout_from_tuple(layout);
        const uint64_t per = l.ring_dim * l.towers();
        if (static_cast<uint64_t>(a.size()) != per * cts.size() ||
            static_cast<uint64_t>(s.size()) != per)
            throw py::value_error("reseed_ciphertexts: a needs n_ciphertexts * towers * ring_dim "
                                  "residues and s towers * ring_dim");
        std::vector<std::pair<uint8_t*, size_t>> bufs;
        for (const auto& c : cts)
            bufs.emplace_back(reinterpret_cast<uint8_t*>(PyByteArray_AsString(c.ptr())),
                              static_cast<size_t>(PyByteArray_Size(c.ptr())));
        const uint64_t* a_data = a.data();
        const uint64_t* s_data = s.data();
        py::gil_scoped_release nogil;
        parallel_ranges(bufs.size(), threads ? threads : default_threads(), 1,
                        [&](unsigned, uint64_t begin, uint64_t end) {
            for (uint64_t i = begin; i < end; ++i)
                reseed_ciphertext(bufs[i].first, bufs[i].second, l, a_data + i * per, s_data);
        });
    }, "Rewrites serialized ciphertexts in place: c0 += (c1 - a) * s, c1 := a (evaluation "
       "form, every tower).");
}

using F32 = py::array_t<float, py::array::c_style>;
using U8 = py::array_t<uint8_t, py::array::c_style>;
using F64 = py::array_t<double, py::array::c_style>;

// Points each view at its mask (None: every value kept), keeping the converted arrays alive in
// `held`; a mask must have as many elements as its tensor.
template <class View>
void attach_masks(const std::vector<py::object>& masks, std::vector<View>& views,
                  std::vector<U8>& held, const char* what) {
    if (masks.size() != views.size())
        throw py::value_error(std::string(what) + ": one mask (or None) per tensor");
    held.resize(masks.size());
    for (size_t i = 0; i < masks.size(); ++i) {
        if (masks[i].is_none()) continue;
        held[i] = masks[i].cast<U8>();
        if (static_cast<uint64_t>(held[i].size()) != views[i].numel)
            throw py::value_error(std::string(what) + ": mask " + std::to_string(i) +
                                  " has a different size than its tensor");
        views[i].mask = held[i].data();
    }
}

void bind_packing(py::module_& m) {
    m.def("pack_values", [](const std::vector<F32>& tensors, const std::vector<py::object>& masks,
                            double scale, double weight_value, double bound, uint64_t out_len,
                            unsigned threads) {
        std::vector<TensorView> views(tensors.size());
        for (size_t i = 0; i < tensors.size(); ++i) {
            views[i].values = tensors[i].data();
            views[i].numel = static_cast<uint64_t>(tensors[i].size());
        }
        std::vector<U8> mask_arrays;
        attach_masks(masks, views, mask_arrays, "pack_values");
        F64 out(static_cast<py::ssize_t>(out_len));
        double* dst = out.mutable_data();
        {
            py::gil_scoped_release nogil;
            pack_values(views, scale, weight_value, bound, dst, out_len,
                        threads ? threads : default_threads());
        }
        return out;
    }, "Compacts, pre-weights and range-checks LoRA tensors into a float64 slot buffer.");
    // The outputs are taken as plain arrays, not F32: pybind11's array_t caster would silently
    // convert a non-contiguous (or float16) output into a temporary copy, and the results
    // written there would be lost. Outputs must be written in place, so anything else is refused.
    m.def("unpack_values", [](const F64& buffer, std::vector<py::array> outs,
                              const std::vector<py::object>& masks, bool divide_by_weight,
                              unsigned threads) {
        std::vector<TensorOut> views(outs.size());
        for (size_t i = 0; i < outs.size(); ++i) {
            if (!outs[i].dtype().is(py::dtype::of<float>()) ||
                !(outs[i].flags() & py::array::c_style) || !outs[i].writeable())
                throw py::value_error("unpack_values: output " + std::to_string(i) +
                                      " must be a writeable C-contiguous float32 array");
            views[i].values = static_cast<float*>(outs[i].mutable_data());
            views[i].numel = static_cast<uint64_t>(outs[i].size());
        }
        std::vector<U8> mask_arrays;
        attach_masks(masks, views, mask_arrays, "unpack_values");
        double weight;
        {
            py::gil_scoped_release nogil;
            weight = unpack_values(buffer.data(), static_cast<uint64_t>(buffer.size()), views,
                                   divide_by_weight, threads ? threads : default_threads());
        }
        return weight;
    }, "Scatters a slot buffer back into float32 tensors (zeros where pruned); returns the weight.");
    m.def("kept_counts", [](const std::vector<py::object>& masks) {
        std::vector<U8> held(masks.size());
        std::vector<TensorView> views(masks.size());
        for (size_t i = 0; i < masks.size(); ++i) {
            held[i] = masks[i].cast<U8>();
            views[i].mask = held[i].data();
            views[i].numel = static_cast<uint64_t>(held[i].size());
        }
        return kept_counts(views);
    }, "Number of kept values in each mask.");
}

// A transform of a copy of `a` (the caller's array stays as it is).
U64 transformed(const U64& a, uint64_t q, uint64_t psi,
                void (*transform)(uint64_t*, size_t, uint64_t, uint64_t)) {
    U64 out(a.size());
    std::memcpy(out.mutable_data(), a.data(), static_cast<size_t>(a.size()) * 8);
    transform(out.mutable_data(), static_cast<size_t>(out.size()), q, psi);
    return out;
}

// Noise flooding (csrc/flood.hpp).
void bind_flood(py::module_& m) {
    m.def("ntt_forward", [](U64 a, uint64_t q, uint64_t psi) {
        return transformed(a, q, psi, ntt_forward);
    }, "OpenFHE's evaluation representation of coefficients mod q (bit-reversed order).");
    m.def("ntt_inverse", [](U64 a, uint64_t q, uint64_t psi) {
        return transformed(a, q, psi, ntt_inverse);
    }, "Coefficients mod q of OpenFHE's evaluation representation (the inverse of ntt_forward).");
    m.def("flood_residues", [](py::buffer blob, const std::vector<uint64_t>& offsets,
                               const py::object& moduli, const std::vector<uint64_t>& roots,
                               uint64_t ring_dim, uint64_t w_hi, uint64_t w_lo) {
        py::buffer_info info = blob.request(true);
        if (info.readonly) throw py::value_error("flood_residues: the buffer must be writable");
        auto* data = static_cast<uint8_t*>(info.ptr);
        const size_t len = static_cast<size_t>(info.size * info.itemsize);
        const std::vector<uint64_t> qs = moduli_of(moduli);
        if (offsets.size() != qs.size())
            throw py::value_error("flood_residues: one offset per tower");
        if (ring_dim == 0 || ring_dim > (1u << 17))
            throw py::value_error("flood_residues: ring_dim out of range");
        // Residue arrays need not be 8-byte aligned in a serialization: work on copies.
        std::vector<std::vector<uint64_t>> towers(qs.size(), std::vector<uint64_t>(ring_dim));
        WipeOnExit<std::vector<uint64_t>> wipe_towers(towers);  // a decryption before flooding
        std::vector<uint64_t*> ptrs;
        for (size_t i = 0; i < qs.size(); ++i) {
            const uint64_t off = offsets[i];
            if (off < 8 || off > len || len - off < 8 * ring_dim)
                throw py::value_error("flood_residues: a residue array lies outside the buffer");
            uint64_t n_word;
            std::memcpy(&n_word, data + off - 8, 8);
            if (n_word != ring_dim)
                throw py::value_error("flood_residues: no residue array of ring_dim at an offset");
            std::memcpy(towers[i].data(), data + off, 8 * ring_dim);
            ptrs.push_back(towers[i].data());
        }
        {
            py::gil_scoped_release nogil;
            flood_towers(ptrs, ring_dim, qs, roots, w_hi, w_lo);
        }
        for (size_t i = 0; i < qs.size(); ++i)
            std::memcpy(data + offsets[i], towers[i].data(), 8 * ring_dim);
    }, "Adds one fresh flooding polynomial (a discrete Gaussian of variance w_hi*2^64 + w_lo) "
       "to the residue arrays (one per tower, evaluation representation) of a writable "
       "serialized polynomial, in place.");
}

// The Aggregator releases the GIL while it folds an update in, so two Python threads sharing
// one could interleave add() and result() on the same accumulator (wrong sums, and a
// heap-use-after-free under ASan). The binding refuses a call while another is running.
struct GuardedAggregator {
    template <class... Args>
    explicit GuardedAggregator(Args&&... args) : agg(std::forward<Args>(args)...) {}
    Aggregator agg;
    std::atomic<bool> busy{false};
};

class InUse {
public:
    InUse(std::atomic<bool>& flag, const char* call) : flag_(flag) {
        bool idle = false;
        if (!flag_.compare_exchange_strong(idle, true))
            throw ConcurrentUseError(std::string("Aggregator.") + call + ": another thread is "
                                     "using this aggregator; an Aggregator is not thread-safe: "
                                     "use one per thread, or serialize the calls");
    }
    ~InUse() { flag_.store(false); }
    InUse(const InUse&) = delete;
    InUse& operator=(const InUse&) = delete;

private:
    std::atomic<bool>& flag_;
};

void bind_aggregator(py::module_& m) {
    py::class_<GuardedAggregator>(m, "Aggregator")
        .def(py::init([](const py::bytes& context_fp, const py::object& modulus, uint32_t ring_dim,
                         uint32_t max_summed, unsigned threads, uint8_t packing,
                         bool allow_aggregates, uint8_t elements, std::optional<uint64_t> round,
                         std::optional<py::bytes> layout_fp, std::optional<py::bytes> mask_fp,
                         std::optional<double> weight_bound) {
                 RoundExpectations e;
                 if (packing != 1 && packing != 2)
                     throw py::value_error("packing must be 1 (complex) or 2 (real)");
                 e.packing = static_cast<Packing>(packing);
                 if (elements != 1 && elements != 2)
                     throw py::value_error("elements must be 1 (seeded) or 2");
                 e.elements = elements;
                 e.allow_aggregates = allow_aggregates;
                 if (round) {
                     e.has_round = true;
                     e.round = *round;
                 }
                 if (layout_fp) {
                     e.has_layout = true;
                     e.layout_fp = fingerprint_of(*layout_fp, "layout_fp");
                 }
                 if (mask_fp) {
                     e.has_mask = true;
                     e.mask_fp = fingerprint_of(*mask_fp, "mask_fp");
                 }
                 if (weight_bound) {
                     e.has_weight_bound = true;
                     e.weight_bound = *weight_bound;
                 }
                 return new GuardedAggregator(fingerprint_of(context_fp, "context_fp"),
                                              moduli_of(modulus), ring_dim, max_summed,
                                              threads, e);
             }),
             py::arg("context_fp"), py::arg("modulus"), py::arg("ring_dim"),
             py::arg("max_summed"), py::arg("threads") = 0, py::arg("packing") = 1,
             py::arg("allow_aggregates") = false, py::arg("elements") = 2,
             py::arg("round") = py::none(),
             py::arg("layout_fp") = py::none(), py::arg("mask_fp") = py::none(),
             py::arg("weight_bound") = py::none())
        .def("add", [](GuardedAggregator& self, const py::buffer& b) {
            auto v = bytes_of(b);
            InUse in_use(self.busy, "add");
            py::gil_scoped_release nogil;
            self.agg.add(v.data(), v.size());
        }, "Validates one serialized update and folds it into the running sum.")
        .def_property_readonly("count", [](GuardedAggregator& self) {
            InUse in_use(self.busy, "count");
            return self.agg.count();
        })
        .def("result", [](GuardedAggregator& self) {
            InUse in_use(self.busy, "result");
            return filled_bytes(self.agg.result_size(),
                                [&](uint8_t* out) { self.agg.write_result(out); });
        }, "The running sum as a serialized aggregate update.");
}

}  // namespace

// For the other binding files (bind_ckks.cpp): an update header from its Python dict.
UpdateHeader header_from_pydict(const py::dict& d) { return header_from_dict(d); }

PYBIND11_MODULE(native, m) {
    m.doc() = "fedshield native core: packing, wire format, ciphertext residue aggregation";
    m.def("default_threads", &default_threads,
          "Threads a native call with threads=0 uses (FEDSHIELD_NUM_THREADS, else the CPUs "
          "this process may use), read afresh on every call.");
    bind_errors(m);
    bind_wire(m);
    bind_ciphertexts(m);
    bind_packing(m);
    bind_aggregator(m);
    bind_seeded(m);
    bind_flood(m);
    bind_importance(m);
    bind_shamir(m);
    bind_partial(m);
    bind_key_codec(m);
    bind_dp(m);
    bind_ckks(m);
}
