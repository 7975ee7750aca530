"""Fused importance scoring + pruning: native CPU path, Triton kernels, torch reference.

The Triton kernels run under TRITON_INTERPRET=1 in a child process: triton decides at
decoration time whether a kernel is interpreted, so flipping the variable inside this process
would depend on what was imported first, and would turn the CUDA tests below into interpreted
ones. The child runs every interpreted case once; the tests here compare its results with the
reference and with the native path.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fedshield as fs
from fedshield.kernels.reference import (importance_mask_reference, importance_scores,
                                         l1_unstructured_masks)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

ODD_SHAPES = {"one": (1,), "a": (1023,), "b": (4097,), "c": (3, 5)}
# 0.37 and 0.5 round oddly: 1023 * 0.37 = 378.51 -> 379; 4097 * 0.5 = 2048.5 -> 2048 (half to
# even, as torch.nn.utils.prune); 1 * 0.5 = 0.5 -> 0.
RATIOS = [0.0, 0.37, 0.5, 0.999, 1.0]


def make_state(shapes, seed=0, *, kind="normal", dtype=torch.float32):
    """name -> tensor; kind "ties" draws from 9 values, "narrow" from [1, 1 + 2**-12)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in shapes.items():
        if kind == "ties":
            t = torch.randint(-4, 5, shape, generator=g).float() / 4
        elif kind == "narrow":
            t = 1 + torch.rand(shape, generator=g) * 2.0 ** -12
        else:
            t = torch.randn(shape, generator=g)
        out[name] = t.to(dtype)
    return out


def criterion_kwargs(criterion, state, seed=1):
    if criterion == "l1":
        return {}
    other = make_state({n: tuple(t.shape) for n, t in state.items()}, seed)
    return {"reference": other} if criterion == "delta" else {"grads": other}


def expected(state, ratio, criterion="l1", scope="per_tensor", **kwargs):
    """(flat keep mask, kept values, kept indices) from kernels/reference.py."""
    sizes = [t.numel() for t in state.values()]
    segments = [sum(sizes)] if scope == "global" else sizes
    values = torch.cat([t.reshape(-1).float() for t in state.values()])
    other = kwargs.get("reference") or kwargs.get("grads")
    if other is not None:
        other = torch.cat([other[n].reshape(-1).float() for n in state])
    return importance_mask_reference(values, other, criterion, segments,
                                     [int(round(ratio * n)) for n in segments])


def flat(masks):
    return torch.cat([m.reshape(-1).cpu() for m in masks.values()])


def assert_same(got, want, what="mask"):
    got, want = got.cpu(), want.cpu()
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    if not torch.equal(got, want):
        i = int(torch.nonzero(got.reshape(-1) != want.reshape(-1))[0])
        pytest.fail(f"{what} differs first at flat index {i}: got {got.reshape(-1)[i]}, "
                    f"expected {want.reshape(-1)[i]}")


def assert_result(result, state, ratio, criterion="l1", scope="per_tensor", **kwargs):
    keep, values, indices = expected(state, ratio, criterion, scope, **kwargs)
    assert list(result.masks) == list(state)
    for name, m in result.masks.items():
        assert m.dtype == torch.bool and m.shape == state[name].shape
    assert_same(flat(result.masks), keep)
    assert_same(result.values, values, "kept values")
    assert_same(result.indices, indices, "kept indices")
    for i, (name, t) in enumerate(state.items()):
        lo, hi = int(result.offsets[i]), int(result.offsets[i + 1])
        assert_same(result.values[lo:hi], t.float()[result.masks[name].cpu()].reshape(-1),
                    f"kept values of {name}")


# -- native CPU path --------------------------------------------------------------------------

@pytest.mark.parametrize("scope", ["per_tensor", "global"])
@pytest.mark.parametrize("criterion", ["l1", "delta", "taylor"])
@pytest.mark.parametrize("ratio", RATIOS)
def test_native_matches_reference(ratio, criterion, scope):
    state = make_state(ODD_SHAPES, seed=3)
    kwargs = criterion_kwargs(criterion, state)
    result = fs.importance_mask(state, ratio, criterion, scope, return_compact=True, **kwargs)
    assert_result(result, state, ratio, criterion, scope, **kwargs)


@pytest.mark.parametrize("scope", ["per_tensor", "global"])
@pytest.mark.parametrize("kind", ["ties", "narrow", "zeros"])
@pytest.mark.parametrize("ratio", [0.01, 0.5, 0.93])
def test_native_ties_and_narrow_ranges(kind, ratio, scope):
    # "narrow" walks all three radix passes; "zeros" is LoRA B at initialization.
    shapes = {"x": (64, 129), "y": (7,), "z": (2048,)}
    if kind == "zeros":
        state = {n: torch.zeros(s) for n, s in shapes.items()}
    else:
        state = make_state(shapes, seed=5, kind=kind)
    result = fs.importance_mask(state, ratio, scope=scope, return_compact=True)
    assert_result(result, state, ratio, scope=scope)


@pytest.mark.parametrize("scope", ["per_tensor", "global"])
@pytest.mark.parametrize("ratio", [0.01, 0.6])
def test_native_segments_spanning_several_chunks(ratio, scope):
    # More than 2**18 values per segment: chunks on several threads, ties across chunks.
    g = torch.Generator().manual_seed(11)
    state = {"big": torch.zeros(600_000), "mixed": torch.randn(300_001, generator=g),
             "tail": torch.zeros(5)}
    state["mixed"][::2] = 0.0
    result = fs.importance_mask(state, ratio, scope=scope, return_compact=True)
    assert_result(result, state, ratio, scope=scope)
    single = fs.importance_mask(state, ratio, scope=scope, threads=1)
    assert_same(flat(single), flat(result.masks), "mask with threads=1")


def test_ties_are_broken_by_position():
    w = torch.tensor([1.0, -1.0, 1.0, 2.0, -1.0, 0.5, -0.0, 0.0])
    mask = fs.importance_mask({"w": w}, 0.5)["w"]  # prunes -0.0, 0.0, 0.5, then the first 1.0
    assert mask.tolist() == [False, True, True, True, True, False, False, False]


@pytest.mark.parametrize("shape", [(1, 1), (1, 1023), (4097, 8), (32, 4096)])
@pytest.mark.parametrize("ratio", [0.2, 0.37, 0.5])
def test_l1_matches_torch_prune_l1_unstructured(shape, ratio):
    # Distinct magnitudes: torch.nn.utils.prune (topk) breaks ties in its own order.
    g = torch.Generator().manual_seed(sum(shape))
    n = shape[0] * shape[1]
    signs = torch.randint(0, 2, (n,), generator=g).float() * 2 - 1
    w = ((torch.randperm(n, generator=g).float() + 1) * signs / 64).reshape(shape)
    got = fs.importance_mask({"w": w}, ratio)["w"]
    assert_same(got, l1_unstructured_masks({"w": w}, ratio)["w"])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_dtypes_are_scored_in_float32(dtype):
    state = make_state(ODD_SHAPES, seed=7, dtype=dtype)
    result = fs.importance_mask(state, 0.37, return_compact=True)
    assert result.values.dtype == torch.float32
    assert_result(result, state, 0.37)


def test_global_scope_uses_one_threshold():
    state = {"small": torch.randn(100) * 0.01, "large": torch.randn(1000)}
    masks = fs.importance_mask(state, 0.3, scope="global")
    kept = torch.cat([state[n][masks[n]].abs() for n in state])
    pruned = torch.cat([state[n][~masks[n]].abs() for n in state])
    assert pruned.numel() == round(0.3 * 1100)
    assert kept.min() >= pruned.max()
    assert not masks["small"].any()  # the tiny tensor goes first


@pytest.mark.parametrize("criterion", ["delta", "taylor"])
def test_delta_and_taylor_scores(criterion):
    state = make_state({"w": (50, 7)}, seed=2)
    other = make_state({"w": (50, 7)}, seed=9)
    kw = {"reference": other} if criterion == "delta" else {"grads": other}
    mask = fs.importance_mask(state, 0.4, criterion, **kw)["w"]
    scores = importance_scores(state["w"], other["w"], criterion)
    assert scores[mask].min() >= scores[~mask].max()
    assert int((~mask).sum()) == round(0.4 * 350)


def test_inputs_are_not_modified_and_grad_tensors_work():
    w = torch.randn(8, 9, requires_grad=True)
    before = w.detach().clone()
    g = torch.randn(8, 9)
    mask = fs.importance_mask({"w": w}, 0.5, "taylor", grads={"w": g})["w"]
    assert torch.equal(w.detach(), before) and mask.sum() == 36


@settings(max_examples=60, deadline=None)
@given(values=st.lists(st.sampled_from([0.0, -0.0, 0.5, -0.5, 1.0, 2.5, -3.0, 1e-30, 7e30]),
                       min_size=1, max_size=70),
       ratio=st.floats(0.0, 1.0), split=st.integers(0, 70), scope=st.sampled_from(["per_tensor",
                                                                                  "global"]))
def test_native_matches_reference_on_random_ties(values, ratio, split, scope):
    t = torch.tensor(values)
    split = min(split, t.numel() - 1)
    state = {"a": t[: split + 1], "b": t[split + 1:]} if split + 1 < t.numel() else {"a": t}
    result = fs.importance_mask(state, ratio, scope=scope, return_compact=True)
    assert_result(result, state, ratio, scope=scope)


# -- bad input ---------------------------------------------------------------------------------

@pytest.mark.parametrize("ratio", [-0.1, 1.5, float("nan"), True, "0.5", None])
def test_bad_ratio(ratio):
    with pytest.raises(fs.ParameterError, match="ratio"):
        fs.importance_mask({"w": torch.ones(3)}, ratio)


@pytest.mark.parametrize("backend", ["native", "torch"])
@pytest.mark.parametrize("where, bad, match", [
    ("state", float("nan"), r"state\['b'\] contains NaN or Inf"),
    ("state", float("-inf"), r"state\['b'\] contains NaN or Inf"),
    ("reference", float("inf"), r"reference\['b'\] contains NaN or Inf"),
    ("grads", float("nan"), r"grads\['b'\] contains NaN or Inf"),
])
def test_non_finite_values_are_rejected(where, bad, match, backend):
    state = {"a": torch.ones(4), "b": torch.ones(300)}
    other = {"a": torch.ones(4), "b": torch.ones(300)}
    (state if where == "state" else other)["b"][123] = bad
    criterion = {"state": "l1", "reference": "delta", "grads": "taylor"}[where]
    kwargs = {} if criterion == "l1" else {"reference" if where == "reference" else "grads": other}
    with pytest.raises(fs.ParameterError, match=match):
        fs.importance_mask(state, 0.5, criterion, backend=backend, **kwargs)


@pytest.mark.parametrize("call, match", [
    (lambda: fs.importance_mask({}, 0.5), "state is empty"),
    (lambda: fs.importance_mask({"w": torch.ones(2, 0)}, 0.5), r"state\['w'\] is empty"),
    (lambda: fs.importance_mask({"w": torch.ones(3)}, 0.5, "l2"), "criterion='l2'"),
    (lambda: fs.importance_mask({"w": torch.ones(3)}, 0.5, scope="layer"), "scope='layer'"),
    (lambda: fs.importance_mask({"w": torch.ones(3)}, 0.5, "taylor"), "needs grads"),
    (lambda: fs.importance_mask({"w": torch.ones(3)}, 0.5, "delta"), "needs reference"),
    (lambda: fs.importance_mask({"w": torch.ones(3)}, 0.5, "taylor", grads={"w": torch.ones(4)}),
     r"grads\['w'\] has shape \(4,\), state\['w'\] has shape \(3,\)"),
    (lambda: fs.importance_mask({"w": torch.ones(3)}, 0.5, "taylor", grads={"v": torch.ones(3)}),
     r"grads\['w'\] is missing"),
    (lambda: fs.importance_mask({"w": torch.ones(3)}, 0.5, "taylor",
                                grads={"w": torch.ones(3), "v": torch.ones(1)}), "lacks"),
    (lambda: fs.importance_mask({"w": torch.ones(3)}, 0.5, grads={"w": torch.ones(3)}),
     "grads= is only used by criterion='taylor'"),
    (lambda: fs.importance_mask({"w": torch.ones(3)}, 0.5, backend="cuda"), "backend='cuda'"),
    (lambda: fs.importance_mask({"w": [1.0]}, 0.5), "expected a tensor"),
    (lambda: fs.importance_mask({"w": torch.ones(3, dtype=torch.complex64)}, 0.5), "complex64"),
])
def test_bad_arguments_name_the_bad_value(call, match):
    with pytest.raises(fs.ParameterError, match=match):
        call()


def test_triton_backend_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(fs.ParameterError, match="TRITON_INTERPRET"):
        fs.importance_mask({"w": torch.ones(3)}, 0.5, backend="triton")


# -- Triton kernels, interpreted on the CPU ----------------------------------------------------

def _interpreted_cases():
    """id -> case; "tile"/"block" shrink the kernels' tiles so small segments span several."""
    cases = {}

    def add(case_id, state, ratio, criterion="l1", scope="per_tensor", tile=2048, block=512):
        cases[case_id] = dict(state=state, ratio=ratio, criterion=criterion, scope=scope,
                              kwargs=criterion_kwargs(criterion, state), tile=tile, block=block)

    odd = make_state({"one": (1,), "a": (1023,), "b": (4097,)}, seed=3)
    for ratio in RATIOS:
        add(f"odd-l1-{ratio}", odd, ratio)
    add("odd-l1-global-0.37", odd, 0.37, scope="global")
    add("odd-delta-0.5", odd, 0.5, "delta")
    add("odd-taylor-global-0.37", odd, 0.37, "taylor", "global")
    add("ties-tiles-0.37", make_state({"a": (1023,), "b": (33, 31)}, 4, kind="ties"), 0.37,
        tile=256, block=64)
    add("ties-tiles-global-0.6", make_state({"a": (1023,), "b": (33, 31)}, 4, kind="ties"), 0.6,
        scope="global", tile=256, block=64)
    add("zeros-tiles-0.3", {"z": torch.zeros(1500), "w": torch.randn(77)}, 0.3, tile=256,
        block=64)
    add("narrow-0.5", make_state({"n": (4097,)}, 6, kind="narrow"), 0.5, tile=1024, block=256)
    signed_zeros = torch.tensor([0.0, -0.0, 1.0, -1.0, -0.0, 2.0, 0.0, -2.0])
    add("signed-zeros-0.5", {"s": signed_zeros}, 0.5)
    add("fp16-0.37", make_state({"h": (1023,)}, 8, dtype=torch.float16), 0.37)
    nan_state = {"a": torch.ones(5), "b": torch.ones(300)}
    nan_state["b"][7] = float("nan")
    add("nan-state", nan_state, 0.5)
    inf_grads = {"a": torch.ones(5), "b": torch.ones(300)}
    inf_grads["b"][3] = float("inf")
    add("inf-grads", {"a": torch.ones(5), "b": torch.ones(300)}, 0.5, "taylor")
    cases["inf-grads"]["kwargs"] = {"grads": inf_grads}
    return cases


INTERPRETED = _interpreted_cases()

_CHILD = r"""
import sys, torch
import fedshield as fs
from fedshield.kernels import importance as kernels
out = {}
for case_id, c in torch.load(sys.argv[1]).items():
    kernels.TILE, kernels.BLOCK = c["tile"], c["block"]
    try:
        r = fs.importance_mask(c["state"], c["ratio"], c["criterion"], c["scope"],
                               return_compact=True, backend="triton", **c["kwargs"])
        out[case_id] = {"masks": {n: m.clone() for n, m in r.masks.items()},
                        "values": r.values, "indices": r.indices, "offsets": r.offsets}
    except fs.ParameterError as e:
        out[case_id] = {"error": str(e)}
torch.save(out, sys.argv[2])
"""


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    """Runs every interpreted case in one child process with TRITON_INTERPRET=1."""
    pytest.importorskip("triton")
    tmp = tmp_path_factory.mktemp("triton_interpret")
    torch.save(INTERPRETED, tmp / "cases.pt")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(tmp / "cases.pt"),
                           str(tmp / "out.pt")], env=env, capture_output=True, text=True,
                          timeout=300)
    if proc.returncode != 0:
        pytest.fail(f"interpreted Triton run failed:\n{proc.stderr[-4000:]}")
    return torch.load(tmp / "out.pt")


@pytest.mark.parametrize("case_id", [c for c in INTERPRETED if not c.startswith(("nan", "inf"))])
def test_triton_interpreted_matches_reference_and_native(interpreted, case_id):
    case, got = INTERPRETED[case_id], interpreted[case_id]
    assert "error" not in got, got.get("error")
    result = fs.ImportanceResult(got["masks"], got["values"], got["indices"], got["offsets"])
    assert_result(result, case["state"], case["ratio"], case["criterion"], case["scope"],
                  **case["kwargs"])
    native = fs.importance_mask(case["state"], case["ratio"], case["criterion"], case["scope"],
                                backend="native", **case["kwargs"])
    assert_same(flat(result.masks), flat(native), "Triton mask vs native mask")


@pytest.mark.parametrize("case_id, match", [
    ("nan-state", r"state\['b'\] contains NaN or Inf \(nan at index 7"),
    ("inf-grads", r"grads\['b'\] contains NaN or Inf \(inf at index 3"),
])
def test_triton_interpreted_rejects_non_finite(interpreted, case_id, match):
    assert "error" in interpreted[case_id]
    with pytest.raises(fs.ParameterError, match=match):
        raise fs.ParameterError(interpreted[case_id]["error"])


# -- Triton kernels on a CUDA GPU (benchmarks/gpu_check.sh runs these) -------------------------

def _cuda_state(kind, seed=0):
    shapes = {f"layers.{i}.lora_{'AB'[i % 2]}": (32, 4096) for i in range(16)}
    shapes.update(ODD_SHAPES)
    if kind == "zeros":
        return {n: torch.zeros(s) for n, s in shapes.items()}
    return make_state(shapes, seed, kind=kind)


@cuda
@pytest.mark.parametrize("kind", ["normal", "ties", "narrow", "zeros"])
@pytest.mark.parametrize("criterion", ["l1", "delta", "taylor"])
@pytest.mark.parametrize("scope", ["per_tensor", "global"])
@pytest.mark.parametrize("ratio", [0.0, 0.37, 0.5, 1.0])
def test_cuda_triton_matches_native(kind, criterion, scope, ratio):
    state = _cuda_state(kind)
    kwargs = criterion_kwargs(criterion, state)
    native = fs.importance_mask(state, ratio, criterion, scope, return_compact=True, **kwargs)
    gpu_state = {n: t.cuda() for n, t in state.items()}
    gpu_kwargs = {k: {n: t.cuda() for n, t in v.items()} for k, v in kwargs.items()}
    got = fs.importance_mask(gpu_state, ratio, criterion, scope, return_compact=True,
                             **gpu_kwargs)
    assert all(m.is_cuda for m in got.masks.values()) and got.values.is_cuda
    assert_same(flat(got.masks), flat(native.masks), "CUDA Triton mask vs native mask")
    assert_same(got.values, native.values, "kept values")
    assert_same(got.indices, native.indices, "kept indices")
    assert_same(got.offsets, native.offsets, "offsets")


@cuda
def test_cuda_triton_matches_reference_on_big_global_segment():
    state = {"w": torch.randn(3_000_001, generator=torch.Generator().manual_seed(1))}
    got = fs.importance_mask({"w": state["w"].cuda()}, 0.61, scope="global", return_compact=True)
    assert_result(got, state, 0.61, scope="global")


@cuda
def test_cuda_triton_rejects_non_finite():
    state = {"a": torch.ones(5, device="cuda"), "b": torch.ones(300, device="cuda")}
    state["b"][9] = float("inf")
    with pytest.raises(fs.ParameterError, match=r"state\['b'\] contains NaN or Inf"):
        fs.importance_mask(state, 0.5)
