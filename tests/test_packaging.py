"""The licence ships with the package: LICENSE (Apache-2.0) at the sdist's root and in the
wheel's dist-info, built by the project's own backend (scikit-build-core's PEP 517 hooks)."""

from __future__ import annotations

import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LICENSE = ROOT / "LICENSE"


def _hook(name: str, out: Path) -> Path:
    """Runs a PEP 517 hook of the build backend in the project root; the path it made."""
    code = (f"import sys, scikit_build_core.build as b; "
            f"print(b.{name}(sys.argv[1]))")
    done = subprocess.run([sys.executable, "-c", code, str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return out / done.stdout.strip().splitlines()[-1]


def test_the_licence_is_apache_2():
    text = LICENSE.read_text()
    assert text.lstrip().startswith("Apache License\n                           Version 2.0")
    assert "END OF TERMS AND CONDITIONS" in text
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'license = { text = "Apache-2.0" }' in pyproject


def test_sdist_ships_the_licence(tmp_path):
    sdist = _hook("build_sdist", tmp_path)
    with tarfile.open(sdist) as tar:
        names = tar.getnames()
        top = names[0].split("/")[0]
        assert f"{top}/LICENSE" in names
        assert tar.extractfile(f"{top}/LICENSE").read() == LICENSE.read_bytes()
    # only the project's own files: no virtual environment or build tree rides along
    assert not [n for n in names if n.startswith((f"{top}/.venv", f"{top}/build/"))]


def test_wheel_metadata_ships_the_licence(tmp_path):
    dist_info = _hook("prepare_metadata_for_build_wheel", tmp_path)
    assert (dist_info / "licenses" / "LICENSE").read_bytes() == LICENSE.read_bytes()
    assert "License: Apache-2.0" in (dist_info / "METADATA").read_text().splitlines()


@pytest.mark.slow
def test_built_wheel_ships_the_licence(tmp_path):
    """The real wheel, built as pip builds it (isolated build requirements; compiles the
    native module in a build directory of its own: minutes on 2 cores)."""
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet",
                           "--config-settings", f"build-dir={tmp_path / 'build'}",
                           "--wheel-dir", str(tmp_path), str(ROOT)],
                          capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    (wheel,) = tmp_path.glob("fedshield-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        licence = [n for n in names if n.endswith(".dist-info/licenses/LICENSE")]
        assert len(licence) == 1, names
        assert zf.read(licence[0]) == LICENSE.read_bytes()
