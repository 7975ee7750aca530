"""The warm process the Flower launcher forks its site workers from
(fedshield.engines.flower.warm_start). Its happy path runs in every launcher test
(tests/test_flower.py: the workers train, each in its own directory, on its own files); here,
what it does when a worker cannot start, and the spec it refuses."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys

import pytest

import fedshield as fs
from fedshield.engines.flower.warm_start import write_spec


def test_a_worker_that_cannot_start_ends_the_group_with_its_code_and_says_why(tmp_path):
    workers = [{"config": tmp_path / f"missing-{i}.toml", "cwd": tmp_path,
                "env": {**os.environ, "FEDSHIELD_NUM_THREADS": "1"},
                "log": tmp_path / f"worker-{i}.log"} for i in range(2)]
    spec = write_spec(tmp_path / "spec.json", workers, exit_with=os.getpid(),
                      preload_run=tmp_path / "run.json")
    assert stat.S_IMODE(spec.stat().st_mode) == 0o600  # it holds the environments
    assert json.loads(spec.read_text())["workers"][1]["config"] == str(workers[1]["config"])
    done = subprocess.run([sys.executable, "-m", "fedshield.engines.flower.warm_start",
                           str(spec)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr
    # the first to exit is named, and its own log says which config it could not read (the
    # other is stopped, maybe before it opened its log)
    first = re.search(r"for \S+/missing-(\d)\.toml exited with 1", done.stdout)
    assert first, done.stdout
    i = first.group(1)
    assert f"missing-{i}.toml" in (tmp_path / f"worker-{i}.log").read_text()


def test_a_spec_without_a_workers_environment_is_refused(tmp_path):
    with pytest.raises(fs.ParameterError, match=r"lacks \['env'\]"):
        write_spec(tmp_path / "spec.json", [{"config": "a", "cwd": "b", "log": "c"}],
                   exit_with=1, preload_run=tmp_path / "run.json")
    assert not (tmp_path / "spec.json").exists()


def test_the_usage_is_named_without_a_spec():
    done = subprocess.run([sys.executable, "-m", "fedshield.engines.flower.warm_start"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "usage" in done.stderr
