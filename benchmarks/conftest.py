"""Shared state of the benchmark suites and the speed-up summary printed at the end of a run."""

from __future__ import annotations

import pytest
import torch

# group -> name -> median seconds, filled by record_median(); baselines are named "baseline".
MEDIANS: dict[str, dict[str, float]] = {}
TARGETS = {"cpu": 5.0, "cuda": 10.0}  # issue 4: >= 5x with the native path, >= 10x with Triton


def llama7b_lora_state(device: str = "cpu", seed: int = 0) -> dict[str, torch.Tensor]:
    """The LoRA state of Llama-2-7B with rank-32 q/v adapters: 128 tensors of 32 x 4096 values."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for layer in range(32):
        for proj in ("q_proj", "v_proj"):
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
            state[f"{prefix}.lora_A.weight"] = torch.randn(32, 4096, generator=g)
            state[f"{prefix}.lora_B.weight"] = torch.randn(4096, 32, generator=g)
    return {name: t.to(device) for name, t in state.items()}


def _record_median(benchmark, group: str, name: str) -> None:
    stats = getattr(benchmark, "stats", None)
    if stats:  # None or empty with --benchmark-disable
        MEDIANS.setdefault(group, {})[name] = stats.stats.median


@pytest.fixture
def record_median():
    """record_median(benchmark, group, name): keeps the median for the speed-up summary."""
    return _record_median


@pytest.fixture(scope="session")
def cpu_state() -> dict[str, torch.Tensor]:
    return llama7b_lora_state("cpu")


@pytest.fixture(scope="session")
def cuda_state() -> dict[str, torch.Tensor]:
    return llama7b_lora_state("cuda")


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's tables
def pytest_terminal_summary(terminalreporter) -> None:
    if not MEDIANS:
        return
    tr = terminalreporter
    tr.section("fs.importance_mask speed-ups over per-tensor torch.nn.utils.prune.l1_unstructured")
    tr.write_line("Llama-2-7B q/v LoRA state (128 tensors x 131072 values), ratio 0.5, medians")
    for group, results in MEDIANS.items():
        base = results.get("baseline")
        device = torch.cuda.get_device_name() if group == "cuda" else "CPU"
        for name, median in results.items():
            if name == "baseline":
                continue
            if base is None:
                tr.write_line(f"  {group:5s} {name:28s} {median * 1e3:10.3f} ms  (no baseline run)")
                continue
            ratio = base / median
            target = TARGETS.get(group)
            verdict = "" if target is None or "per_tensor" not in name else (
                f"  target >= {target:g}x: {'met' if ratio >= target else 'NOT met'}")
            tr.write_line(f"  {group:5s} {name:28s} {median * 1e3:10.3f} ms vs "
                          f"{base * 1e3:10.3f} ms -> {ratio:8.1f}x{verdict}  [{device}]")
