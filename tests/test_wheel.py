"""`make wheel`: an sdist, a wheel built from it, repaired by auditwheel to a manylinux tag;
the repaired wheel installs into a fresh venv with no compiler on the PATH and aggregates
there (slow: it compiles the native module once)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import fedshield as fs

from conftest import make_state, weighted_average

ROOT = Path(__file__).resolve().parents[1]
COMPILERS = ("cc", "gcc", "g++", "c++", "clang", "cmake")

AGGREGATE = textwrap.dedent("""
    import sys
    from pathlib import Path
    import fedshield as fs
    assert "torch" not in sys.modules and "openfhe" not in sys.modules
    work = Path(sys.argv[1])
    ctx = fs.load_context(work / "server.ctx")
    ups = [fs.EncryptedUpdate.from_bytes((work / f"u{i}.bin").read_bytes()) for i in (0, 1)]
    (work / "agg.bin").write_bytes(fs.aggregate(ctx, ups).to_bytes())
    print(fs.__file__)
""")


@pytest.mark.slow
def test_make_wheel_installs_without_a_compiler_and_aggregates(tmp_path, shared_keys):
    env = {k: v for k, v in os.environ.items() if k not in ("CC", "CXX")}
    build = subprocess.run(["make", "wheel", f"VENV={Path(sys.executable).parents[1]}"],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    dist = ROOT / "dist"
    assert len(list(dist.glob("fedshield-*.tar.gz"))) == 1          # the sdist built ...
    assert len(list(dist.glob("fedshield-*-linux_x86_64.whl"))) == 1   # ... and a wheel from it
    (wheel,) = (dist / "wheelhouse").glob("fedshield-*.whl")
    assert "-manylinux_" in wheel.name and wheel.name.endswith("_x86_64.whl"), wheel.name

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    bare = {**env, "PATH": str(venv / "bin"), "PYTHONPATH": "", "PYTHONNOUSERSITE": "1"}
    assert not any(shutil.which(c, path=bare["PATH"]) for c in COMPILERS)
    install = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet",
                              str(wheel)], env=bare, capture_output=True, text=True,
                             timeout=600)
    assert install.returncode == 0, install.stderr[-3000:]

    client = shared_keys.client_context()
    states = [make_state(i) for i in (0, 1)]
    layout = fs.Layout.from_state_dict(states[0])
    for i, (state, w) in enumerate(zip(states, (2.0, 6.0))):
        upd = fs.encrypt_update(client, state, layout, weight=w, weight_bound=8.0)
        (tmp_path / f"u{i}.bin").write_bytes(upd.to_bytes())
    shared_keys.server_context().save(tmp_path / "server.ctx")
    run = subprocess.run([str(venv / "bin" / "python"), "-c", AGGREGATE, str(tmp_path)],
                         env=bare, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().startswith(str(venv))      # the wheel's fedshield, not ours
    agg = fs.EncryptedUpdate.from_bytes((tmp_path / "agg.bin").read_bytes())
    avg = fs.decrypt_update(client, agg, layout)
    ref = weighted_average(states, [2.0, 6.0])
    for name in ref:
        np.testing.assert_allclose(avg[name].numpy(), ref[name], atol=1e-6, rtol=0)
