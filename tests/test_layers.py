"""The package's layering, checked on the source: layers import downward only, and a lazy
(function-level) import is allowed only where it gates a heavy optional dependency. And the
tests use the package's public names only (a private one a test needs is an API that wants to
be public).

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
    ("cli.commands", "engines.flower.site_executor"): "flwr: `fedshield site executor` only",
    ("cli.commands", "engines.flower.supernode"): "flwr: `fedshield site supernode` only",
    ("cli.commands", "training.evaluation"): "torch: `fedshield eval` only",
    ("cli.commands", "run.report"): "matplotlib: `fedshield report` only",
    ("cli.commands", "run.bench"): "torch and openfhe: `fedshield bench` only",
    ("engines.flower.server_app", "run.plots"): "matplotlib, optional on a server",
    ("engines.flower.warm_start", "engines.flower.site_worker"):
        "torch and transformers: the warm process only, not the launcher that writes its spec",
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


# -- tests use public names only ---------------------------------------------------------------
TESTS = ROOT / "tests"
TEST_FILES = sorted(TESTS.rglob("*.py"))
# Modules a test may import from: the package, and the helper modules beside the tests.
SIBLINGS = {p.stem for p in TESTS.glob("*.py")}


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _package_private_names() -> set[str]:
    """Every private name the package defines: functions, classes, module constants and
    attributes it assigns (self._x = ...)."""
    names = set()
    for _, path, _ in MODULES:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
    return {n for n in names if _is_private(n)}


PACKAGE_PRIVATE = _package_private_names()


def _root(node: ast.expr) -> str | None:
    """The name an attribute chain (a.b.c, a.b[0].c, a.f().c) starts from."""
    while isinstance(node, (ast.Attribute, ast.Subscript, ast.Call)):
        node = node.func if isinstance(node, ast.Call) else node.value
    return node.id if isinstance(node, ast.Name) else None


def private_uses(path: Path, private: set[str] = PACKAGE_PRIVATE) -> list[str]:
    """'line N: what' for each private name of fedshield (or of a test helper module) that
    the test file at ``path`` reaches: imported, read as an attribute of a name bound to
    fedshield, named in (set|get|has|del)attr on one, or read as an attribute anywhere
    (but self/cls) when the package defines that private name."""
    tree = ast.parse(path.read_text(), str(path))
    ours: set[str] = set()   # names bound to fedshield modules or objects
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "fedshield":
                    ours.add(alias.asname or "fedshield")
                    if any(map(_is_private, alias.name.split("."))):
                        found.append(f"line {node.lineno}: import {alias.name}")
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            parts = node.module.split(".")
            if parts[0] == "fedshield":
                ours.update(a.asname or a.name for a in node.names)
                if any(map(_is_private, parts)):
                    found.append(f"line {node.lineno}: from {node.module} import ...")
            if parts[0] == "fedshield" or node.module in SIBLINGS:
                found += [f"line {node.lineno}: from {node.module} import {a.name}"
                          for a in node.names if _is_private(a.name)]
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _is_private(node.attr):
            root = _root(node.value)
            if root in ours or (node.attr in private and root not in ("self", "cls")):
                found.append(f"line {node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.Call) and len(node.args) >= 2 \
                and isinstance(node.args[1], ast.Constant) \
                and isinstance(node.args[1].value, str) and _is_private(node.args[1].value):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
            if name in ("setattr", "getattr", "hasattr", "delattr") \
                    and _root(node.args[0]) in ours:
                found.append(f"line {node.lineno}: {ast.unparse(node)[:80]}")
    return sorted(set(found), key=lambda f: int(f.split(":")[0][5:]))


@pytest.mark.parametrize("path", TEST_FILES, ids=lambda p: str(p.relative_to(TESTS)))
def test_tests_use_public_names_only(path):
    """A test that needs a private name points at an API that wants to be public."""
    found = private_uses(path)
    assert not found, f"{path.relative_to(ROOT)} reaches private names:\n" + "\n".join(found)


def test_the_private_name_checker_sees_violations(tmp_path):
    """Each form is found in a planted test file; public names, dunders, a test's own private
    attributes and other libraries' are not."""
    planted = tmp_path / "test_planted.py"
    planted.write_text(
        "import fedshield as fs\n"                                    # 1
        "import fedshield._hidden\n"                                  # 2
        "from fedshield import _hidden\n"                             # 3
        "from fedshield.he import context as hc, _wiped\n"            # 4
        "from fedshield._hidden import thing\n"                       # 5
        "from conftest import _helper\n"                              # 6
        "x = fs.he._secret\n"                                         # 7
        "y = hc.Context._check_open\n"                                # 8
        "def test(monkeypatch, ctx):\n"                               # 9
        "    monkeypatch.setattr(hc, '_wipe', None)\n"                # 10
        "    ctx._secret_key\n"                                       # 11
        "    getattr(fs, '_private')\n"                               # 12
        "    fs.__version__, fs.he.context.wipe, self._mine\n"        # 13
        "    import os; os._exit, ctx._not_a_package_name\n")         # 14
    found = private_uses(planted, private={"_secret_key"})
    lines = [int(f.split(":")[0][5:]) for f in found]
    assert lines == [2, 3, 4, 5, 6, 7, 8, 10, 11, 12], found
    # the package's own private names are known (attributes, methods, module functions)
    assert {"_secret_key", "_check_open", "_saved"} <= PACKAGE_PRIVATE
