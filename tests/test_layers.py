"""The package's layering, checked on the source: layers import downward only, and a lazy
(function-level) import is allowed only where it gates a heavy optional dependency.

The package's top level is the layer table, bottom to top:

- base (errors, atomic writes, threads, value checks)
- native (the compiled C++ kernels from csrc/: packing, wire, aggregation, sampling; imports
  nothing from the package, and he/ is the Python layer over it)
- he (CKKS: parameters, keys, encryption, aggregation, partial decryption, wire formats)
- data, kernels (peers: data files and prompts; the Triton importance kernel)
- config (the run's settings)
- trust, training (peers: identities, the pinned federation, quorum, the decryption guard;
  the base model, LoRA, adapter I/O, the training loop, evaluation, pruning, DP)
- run (a run on disk: directory, checkpoints, plots, report, benchmarks)
- fl (the protocol: messages, server, party, site, key set-up)
- engines (the transports: local, flower)
- cli
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "python" / "fedshield"
KERNELS = ROOT / "kernels"

LAYER_OF = {
    "base": "base",
    "native": "native",
    "he": "he",
    "data": "data", "kernels": "kernels",
    "config": "config",
    "trust": "trust",
    "training": "training", "pruning": "training", "dp": "training",
    "run": "run",
    "fl": "fl",
    "engines": "engines",
    "cli": "cli",
}
ORDER = ["base", "native", "he", "data", "kernels", "config", "trust", "training", "run", "fl",
         "engines", "cli"]
# What each layer may import besides itself (peers import neither each other).
ALLOWED = {
    "base": set(),
    "native": set(),
    "he": {"base", "native"},
    "data": {"base"},
    "kernels": set(),
    "config": {"base", "native", "data", "he"},
    "trust": {"base", "native", "he", "config"},
    "training": {"base", "native", "he", "data", "kernels", "config"},
    "run": {"base", "native", "he", "data", "kernels", "config", "training"},
    "fl": {"base", "native", "he", "data", "kernels", "config", "trust", "training", "run"},
    "engines": set(ORDER[:ORDER.index("engines")]),
    "cli": set(ORDER) - {"cli"},
}
# Heavy optional dependencies a function may import on first use.
HEAVY = {"torch", "transformers", "peft", "openfhe", "triton", "flwr", "matplotlib",
         "safetensors", "pyarrow", "tokenizers", "bitsandbytes"}
# fedshield modules a function may import lazily, and why (each gates a heavy dependency).
LAZY_OK = {
    ("pruning.mask", "kernels.importance"): "triton, for CUDA tensors only",
    ("cli.commands", "engines.local"): "torch: `fedshield run` only",
    ("cli.commands", "engines.flower.launcher"): "flwr: --engine flower only",
    ("cli.commands", "engines.flower.site_worker"): "torch and openfhe: `fedshield site worker` only",
    ("cli.commands", "training.evaluation"): "torch: `fedshield eval` only",
    ("cli.commands", "run.report"): "matplotlib: `fedshield report` only",
    ("cli.commands", "run.bench"): "torch and openfhe: `fedshield bench` only",
    ("engines.flower.server_app", "run.plots"): "matplotlib, optional on a server",
}


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).with_suffix("")
        parts = [p for p in rel.parts if p != "__init__"]
        yield ".".join(parts), path, path.name == "__init__.py"
    for path in sorted(KERNELS.glob("*.py")):
        name = "kernels" if path.name == "__init__.py" else f"kernels.{path.stem}"
        yield name, path, path.name == "__init__.py"


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> list[str]:
    """The fedshield modules an ImportFrom names (relative or absolute)."""
    if node.level == 0:
        base = node.module or ""
        if not base.startswith("fedshield"):
            return []
        base = base[len("fedshield"):].lstrip(".")
    else:
        parts = module.split(".") if module else []
        keep = len(parts) - node.level + (1 if is_package else 0)
        base = ".".join(parts[:max(keep, 0)] + ([node.module] if node.module else []))
    if node.module is None or not base:
        return [f"{base}.{a.name}".strip(".") for a in node.names]
    return [base]


def _imports(module: str, path: Path, is_package: bool):
    """(target, lazy, line) for every fedshield import, and (name, line) of lazy third-party
    and standard-library imports."""
    tree = ast.parse(path.read_text(), str(path))
    ours, lazy_other = [], []

    def visit(node, in_function: bool):
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.ImportFrom):
                targets = _resolve(module, is_package, child)
                for t in targets:
                    ours.append((t, in_function, child.lineno))
                if not targets and in_function:
                    lazy_other.append(((child.module or "").split(".")[0], child.lineno))
            elif isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name.startswith("fedshield"):
                        t = alias.name[len("fedshield"):].lstrip(".")
                        ours.append((t, in_function, child.lineno))
                    elif in_function:
                        lazy_other.append((alias.name.split(".")[0], child.lineno))
            visit(child, inside)

    visit(tree, False)
    return ours, lazy_other


def _layer(module: str) -> str | None:
    top = module.split(".")[0] if module else ""
    return LAYER_OF.get(top)


MODULES = list(_modules())


def test_every_module_has_a_layer():
    missing = [m for m, _, _ in MODULES if m and _layer(m) is None]
    assert not missing, f"modules without a layer: {missing}"


@pytest.mark.parametrize("module, path, is_package", MODULES, ids=[m or "fedshield" for m, _, _
                                                                    in MODULES])
def test_imports_go_downward_and_lazy_ones_gate_heavy_dependencies(module, path, is_package):
    ours, lazy_other = _imports(module, path, is_package)
    layer = _layer(module) if module else "cli"  # the package __init__ is the public surface
    problems = []
    for target, lazy, line in ours:
        target_layer = _layer(target)
        if target_layer is None:
            problems.append(f"line {line}: imports unknown fedshield module {target!r}")
        elif target_layer != layer and target_layer not in ALLOWED[layer]:
            problems.append(f"line {line}: {layer} layer imports {target!r} "
                            f"({target_layer} layer, above or beside it)")
        if lazy and (module, target) not in LAZY_OK:
            problems.append(f"line {line}: lazy import of fedshield.{target} (import it at the "
                            "top, or fix the layering)")
    for name, line in lazy_other:
        if name not in HEAVY:
            problems.append(f"line {line}: lazy import of {name!r}, which is not a heavy "
                            "optional dependency")
    assert not problems, f"{path.relative_to(ROOT)}:\n" + "\n".join(problems)


def test_the_checker_sees_violations(tmp_path):
    """The check above can fail: an upward and a lazy import in a fake he module are found."""
    fake = tmp_path / "fake.py"
    fake.write_text("from ..fl import server\n\ndef f():\n    from ..he import context\n"
                    "    import json\n")
    ours, lazy_other = _imports("he.fake", fake, False)
    assert ("fl", False, 1) in ours and ("he", True, 4) in ours
    assert _layer("fl") not in ALLOWED["he"]
    assert ("json", 5) in lazy_other
