"""fs.importance_mask vs per-tensor torch.nn.utils.prune.l1_unstructured on the 7B LoRA state.

    pytest benchmarks/test_bench_importance.py            # CPU (native) and, with CUDA, Triton
    benchmarks/gpu_check.sh                               # on a CUDA machine, tests included

The speed-ups are printed at the end of the run (see conftest.py).
"""

from __future__ import annotations

import pytest
import torch

import fedshield as fs
from fedshield.kernels.reference import l1_unstructured_masks

RATIO = 0.5
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def check_masks(state, masks):
    """Every tensor prunes round(RATIO * n) values, and no kept value is smaller than a pruned."""
    for name, t in state.items():
        m = masks[name]
        assert int((~m).sum()) == round(RATIO * t.numel()), name
        assert t[m].abs().min() >= t[~m].abs().max(), name


def _synced(fn):
    def run():
        out = fn()
        torch.cuda.synchronize()
        return out
    return run


# -- CPU: the native path ---------------------------------------------------------------------

@pytest.mark.benchmark(group="cpu")
def test_cpu_baseline_l1_unstructured(benchmark, cpu_state, record_median):
    masks = benchmark.pedantic(l1_unstructured_masks, (cpu_state, RATIO), rounds=3,
                               iterations=1)
    record_median(benchmark, "cpu", "baseline")
    check_masks(cpu_state, masks)


@pytest.mark.benchmark(group="cpu")
@pytest.mark.parametrize("scope, compact", [("per_tensor", False), ("per_tensor", True),
                                            ("global", False)])
def test_cpu_native_importance_mask(benchmark, cpu_state, record_median, scope, compact):
    out = benchmark.pedantic(fs.importance_mask, (cpu_state, RATIO), dict(
        scope=scope, return_compact=compact), rounds=20, iterations=1, warmup_rounds=2)
    record_median(benchmark, "cpu", f"native {scope}{' compact' if compact else ''}")
    if scope == "per_tensor":
        check_masks(cpu_state, out.masks if compact else out)


# -- CUDA: the Triton path --------------------------------------------------------------------

@cuda
@pytest.mark.benchmark(group="cuda")
def test_cuda_baseline_l1_unstructured(benchmark, cuda_state, record_median):
    masks = benchmark.pedantic(_synced(lambda: l1_unstructured_masks(cuda_state, RATIO)),
                               rounds=10, iterations=1, warmup_rounds=2)
    record_median(benchmark, "cuda", "baseline")
    check_masks(cuda_state, masks)


@cuda
@pytest.mark.benchmark(group="cuda")
@pytest.mark.parametrize("scope, compact", [("per_tensor", False), ("per_tensor", True),
                                            ("global", False)])
def test_cuda_triton_importance_mask(benchmark, cuda_state, cpu_state, record_median, scope,
                                     compact):
    out = benchmark.pedantic(_synced(lambda: fs.importance_mask(
        cuda_state, RATIO, scope=scope, return_compact=compact)),
        rounds=50, iterations=1, warmup_rounds=3)
    record_median(benchmark, "cuda", f"triton {scope}{' compact' if compact else ''}")
    masks = out.masks if compact else out
    native = fs.importance_mask(cpu_state, RATIO, scope=scope)
    assert all(torch.equal(masks[n].cpu(), native[n]) for n in native)
