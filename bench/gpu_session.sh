#!/usr/bin/env bash
# One GPU-lease batch: build the CUDA ops in place, run the kernel suites with CUDA
# present (Triton and CUDA backends forced in turn), then the benchmark table.
# Usage (on the GPU machine, repo root): bash bench/gpu_session.sh OUTDIR [tests|bench|all]
set -uo pipefail
OUT=${1:-/tmp/worm-gpu}; WHAT=${2:-all}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/python:$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi -L
python3 -c "import torch,triton,sys;print('torch',torch.__version__,'triton',triton.__version__,'py',sys.version.split()[0])"
if [ ! -e python/worm/_C*.so ] || [ -n "${REBUILD:-}" ]; then
  ( time WORM_CUDA_ARCHS=90 MAX_JOBS=16 python3 setup.py build_ext --inplace ) >"$OUT/build.log" 2>&1
  grep -iE "error|warning \(worm\)|real" "$OUT/build.log" | head -30
fi
python3 -c "import worm._ops as o; print(o.backend_info('cuda'))"
if [ "$WHAT" != bench ]; then
  for be in triton cuda; do
    WORM_BACKEND=$be timeout ${TEST_TIMEOUT:-200} python3 -m pytest -q -p no:cacheprovider -m "" \
      ${TESTS:-tests/test_ops.py tests/test_backend_search.py tests/test_optim.py tests/test_search.py} \
      >"$OUT/tests_$be.log" 2>&1
    echo "== WORM_BACKEND=$be rc=$?"; grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/tests_$be.log" | head -40
  done
  timeout 120 python3 -m pytest -q -p no:cacheprovider -m "" tests/test_compile.py tests/test_models_prune.py >"$OUT/tests_default.log" 2>&1
  echo "== default backend rc=$?"; grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/tests_default.log" | head -20
fi
if [ "$WHAT" != tests ]; then
  timeout ${BENCH_TIMEOUT:-240} python3 bench/table.py --out "$OUT" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log" | grep -vE "^  \{"
  echo "== bench rc=$?"
fi
