#!/usr/bin/env bash
# One command on a CUDA machine: every importance_mask test (the GPU ones included), the
# GPU training tests (tests/test_algorithms.py: device placement, 8/4-bit loading), a site of
# several ranks on NCCL (DDP, FSDP1, FSDP2: benchmarks/nccl_site.py under torchrun), sites on
# Flower's simulation runtime sharing the GPU (a fraction each), and every benchmark (CPU
# native and CUDA Triton vs torch.nn.utils.prune.l1_unstructured), then the speed-ups.
# Works from a fresh checkout:
#
#   bash benchmarks/gpu_check.sh [extra pytest-benchmark args, e.g. --benchmark-json=out.json]
#
# Python: .venv/bin/python when present. Otherwise .venv is made from python3.10, python3.12 or
# python3, preferring one that already has torch and triton: that venv reuses them (and pytest,
# scikit-build-core, pybind11 when there) and only fedshield itself is built, so an offline GPU
# box works. Otherwise `pip install -e .[client,dev]` fetches what is missing.
# Set GPU_CHECK_ALLOW_CPU=1 to run it without a GPU (the CUDA tests and benchmarks then skip).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONUNBUFFERED=1
step() { printf '\n== %s\n' "$*"; }
has() { "$1" -c "import $2" >/dev/null 2>&1; }

if [ ! -x .venv/bin/python ]; then
  first="" base=""
  for p in python3.10 python3.12 python3; do
    command -v "$p" >/dev/null 2>&1 || continue
    [ -n "$first" ] || first=$p
    if has "$p" "torch, triton"; then base=$p; break; fi
  done
  [ -n "$first" ] || { echo "gpu_check: no python3.10, python3.12 or python3 on PATH" >&2; exit 1; }
  if [ -n "$base" ]; then
    step "creating .venv from $base ($($base -V 2>&1)), reusing its torch and triton"
    "$base" -m venv --system-site-packages .venv
    if ! has .venv/bin/python torch; then
      # $base is itself a venv: --system-site-packages skipped its packages, so point at them.
      site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
      "$base" -c 'import sysconfig; p = sysconfig.get_paths()
print("\n".join(dict.fromkeys([p["purelib"], p["platlib"]])))' > "$site/_gpu_check_base.pth"
    fi
  else
    step "creating .venv from $first ($($first -V 2>&1))"
    "$first" -m venv .venv
  fi
fi
PY=.venv/bin/python

if ! "$PY" -c "import fedshield.native as n, fedshield.kernels.importance; n.importance_mask" \
    >/dev/null 2>&1; then
  step "building and installing fedshield (native module)"
  if has "$PY" "torch, triton, scikit_build_core, pybind11, pytest, pytest_benchmark, hypothesis"
  then
    "$PY" -m pip install -q --no-build-isolation --no-deps --no-index -e .
  else
    "$PY" -m pip install -q -e ".[client,dev]"
  fi
fi

step "environment"
"$PY" - <<'EOF'
import os, sys
import torch, triton
cuda = torch.cuda.is_available()
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, triton {triton.__version__}")
gpu = torch.cuda.get_device_name() if cuda else "no CUDA GPU"
print(f"device: {gpu} | {os.cpu_count()} CPUs")
if not cuda and os.environ.get("GPU_CHECK_ALLOW_CPU") != "1":
    sys.exit("gpu_check: torch sees no CUDA GPU (set GPU_CHECK_ALLOW_CPU=1 to run anyway)")
EOF

step "tests: tests/test_importance.py (native, interpreted Triton, CUDA Triton)"
# --noconftest: the suite's conftest.py imports openfhe, which this file does not need.
"$PY" -m pytest tests/test_importance.py --noconftest -q -p no:cacheprovider

step "tests: training on the GPU (device placement, 8/4-bit loading when bitsandbytes is there)"
"$PY" -m pytest tests/test_algorithms.py --noconftest -q -p no:cacheprovider -rs \
  -k "gpu or quantized"

step "benchmarks: benchmarks/test_bench_importance.py"
"$PY" -m pytest benchmarks/test_bench_importance.py -q -p no:cacheprovider \
  --benchmark-columns=min,median,max,rounds --benchmark-sort=name "$@"

if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  gpus=$("$PY" -c "import torch; print(torch.cuda.device_count())")
  ranks=$(( gpus >= 2 ? 2 : 1 ))   # NCCL allows one rank per GPU
  step "a site of $ranks rank(s) on NCCL: DDP, FSDP1, FSDP2 (benchmarks/nccl_site.py)"
  key=$(mktemp -d)/site.key
  "$PY" -c "import fedshield as fs, sys; fs.keygen_shared().client_context().save(sys.argv[1])" "$key"
  for wrapper in ddp fsdp1 fsdp2; do
    FEDSHIELD_SITE_KEY=$key "$PY" -m torch.distributed.run --standalone --nproc-per-node="$ranks" \
      benchmarks/nccl_site.py --wrapper "$wrapper"
  done

  if "$PY" -c "import ray, flwr" >/dev/null 2>&1; then
    step "2 sites on Flower's simulation runtime, half a GPU each"
    "$PY" - <<'EOF'
import tempfile, time
from fedshield.config import RunConfig
from fedshield.engines.flower.launcher import SiteResources, run_flower
with tempfile.TemporaryDirectory() as tmp:
    cfg = RunConfig.from_flat(clients=2, rounds=2, samples=0, engine="flower", device="cuda",
                              out=tmp)
    start = time.perf_counter()
    m = run_flower(cfg, simulation=SiteResources(cpus=1, gpus=0.5))
    status = [r["status"] for r in m["rounds"]]
    print(f"simulation runtime on the GPU: rounds {status}, eval loss "
          f"{m['initial_eval_loss']:.4f} -> {m['rounds'][-1]['eval_loss']:.4f}, "
          f"{time.perf_counter() - start:.1f} s")
    assert status == ["ok", "ok"]
EOF
  fi
fi
