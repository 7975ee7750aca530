"""Loaded at start-up by every Python process of `make asan-test` (PYTHONPATH=tests/asan): puts
the AddressSanitizer/UBSan build of fedshield.native (FEDSHIELD_NATIVE, built by plain CMake
into build/asan) in place of the installed one, in the test process and in every child it
starts. Python itself is not instrumented; libasan is preloaded (LD_PRELOAD)."""

import importlib.util
import os
import sys

_path = os.environ.get("FEDSHIELD_NATIVE")
if _path:
    _spec = importlib.util.spec_from_file_location("fedshield.native", _path)
    _module = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_module)
    # `from .. import native` inside fedshield finds it here before any finder runs
    sys.modules["fedshield.native"] = _module
