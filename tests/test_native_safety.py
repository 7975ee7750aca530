"""The native core under hostile conditions of its own: no thread to be had, and secrets
wiped with stores the compiler cannot drop (issue 15, item 5)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fedshield import native

CSRC = Path(__file__).resolve().parent.parent / "csrc"

# pthread_create that fails with EAGAIN once switched on (a machine out of threads or memory)
NO_THREADS_SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
static int failing = 0;
void fail_threads(int on) { failing = on; }
int pthread_create(pthread_t* t, const pthread_attr_t* a, void* (*f)(void*), void* arg) {
    static int (*real)(pthread_t*, const pthread_attr_t*, void* (*)(void*), void*);
    if (failing) return EAGAIN;
    if (!real) real = dlsym(RTLD_NEXT, "pthread_create");
    return real(t, a, f, arg);
}
"""

NO_THREADS_CHILD = textwrap.dedent("""
    import ctypes, sys, threading
    import numpy as np
    import fedshield as fs
    from fedshield import native
    from conftest import ELEMENTS, RING_DIM, make_state

    keys = fs.keygen_shared()
    client, server = keys.client_context(), keys.server_context()
    layout = fs.Layout.from_state_dict(make_state(0, {"w": (40_000,)}))
    ups = [fs.encrypt_update(client, make_state(80 + i, {"w": (40_000,)}), layout,
                             weight=1.0 + i, round=1, weight_bound=8.0).to_bytes()
           for i in range(3)]
    blob = bytes(range(256)) * 40_000
    values = [np.linspace(-1, 1, 300_001, dtype=np.float32)]

    def run(threads):
        agg = native.Aggregator(server.fingerprint, server.modulus, RING_DIM, 64, threads,
                                 elements=ELEMENTS)
        for u in ups:
            agg.add(u)
        packed = native.pack_values(values, [None], 0.5, 0.5, 4.0, 300_002, threads)
        return agg.result(), native.checksum64(blob), packed.tobytes()

    expected = run(1)
    shim = ctypes.CDLL(sys.argv[1])
    shim.fail_threads(1)
    try:  # the shim is in effect: not even Python can start a thread now
        threading.Thread(target=lambda: None).start()
        sys.exit("the pthread_create shim is not in effect")
    except RuntimeError:
        pass
    got = run(8)  # every range but the caller's wants a thread it cannot have
    shim.fail_threads(0)
    assert got == expected, "results differ when no thread can be started"
    print("CHILD-OK")
""")


def test_no_thread_to_be_had_falls_back_to_the_calling_thread(tmp_path):
    """parallel.hpp used to leave joinable threads behind (std::terminate) when starting one
    failed other than with std::system_error; now every range that gets no thread runs on the
    calling thread. A preloaded pthread_create that fails with EAGAIN: the aggregator, the
    checksum and the packer still finish, with the same bytes as single-threaded."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build the pthread_create shim")
    (tmp_path / "shim.c").write_text(NO_THREADS_SHIM)
    shim = tmp_path / "libnothreads.so"
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(shim), str(tmp_path / "shim.c"), "-ldl"],
                   check=True)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent),
           "LD_PRELOAD": " ".join(filter(None, [os.environ.get("LD_PRELOAD"), str(shim)]))}
    proc = subprocess.run([sys.executable, "-c", NO_THREADS_CHILD, str(shim)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0 and "CHILD-OK" in proc.stdout, (proc.returncode,
                                                                proc.stderr[-3000:])


def test_secrets_are_wiped_with_explicit_bzero():
    """A memset right before a buffer is freed may be dropped by the optimizer; the native core
    wipes key residues, Shamir coefficients and flooding noise with secure_wipe
    (explicit_bzero), and no plain memset of zeros remains in the files that hold secrets."""
    if sys.platform.startswith("linux"):
        assert b"explicit_bzero" in Path(native.__file__).read_bytes()
    for name in ("shamir.cpp", "flood.cpp", "bind_shamir.cpp"):
        source = (CSRC / name).read_text()
        assert "secure_wipe.hpp" in source, name
        assert not re.search(r"memset\([^;]*,\s*0\s*,", source), name
        assert "std::fill" not in source, name
