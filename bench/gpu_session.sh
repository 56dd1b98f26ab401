#!/usr/bin/env bash
# One GPU-lease batch: build the CUDA ops in place, run the GPU-relevant suites with
# CUDA present (default choice, then Triton and CUDA forced), profile a sampling step,
# then the benchmark table. Logs and records land in OUTDIR.
# Usage (on the GPU machine, repo root): bash bench/gpu_session.sh OUTDIR [tests|bench|all]
set -uo pipefail
OUT=${1:-/tmp/worm-gpu}; WHAT=${2:-all}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/python:$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi -L
python3 -c "import torch,triton,sys;print('torch',torch.__version__,'triton',triton.__version__,'py',sys.version.split()[0])"
if ! ls python/worm/_C*.so >/dev/null 2>&1 || [ -n "${REBUILD:-}" ]; then
  ( time WORM_CUDA_ARCHS=90 MAX_JOBS=16 python3 setup.py build_ext --inplace ) >"$OUT/build.log" 2>&1
  grep -iE " error|warning \(worm\)|^real" "$OUT/build.log" | head -20
fi
python3 -c "import worm; print(worm.backend_info('cuda'), '->', worm.backend('cuda'))"
OPS="tests/test_ops.py tests/test_gpu_select.py tests/test_backend_search.py"
if [ "$WHAT" != bench ]; then
  for be in default triton cuda; do
    if [ $be = default ]; then sel="$OPS tests/test_search.py tests/test_optim.py tests/test_compile.py ${EXTRA_TESTS:-}"; else sel=$OPS; fi
    WORM_BACKEND=$([ $be = default ] || echo $be) timeout ${TEST_TIMEOUT:-150} \
      python3 -m pytest -q -p no:cacheprovider -m "" $sel >"$OUT/tests_$be.log" 2>&1
    echo "== tests, backend $be: rc=$?"; grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/tests_$be.log" | head -20
  done
fi
if [ "$WHAT" != tests ]; then
  timeout 90 python3 bench/profile_sample.py >"$OUT/profile.log" 2>&1; echo "== profile rc=$?"; head -70 "$OUT/profile.log"
  timeout ${BENCH_TIMEOUT:-240} python3 bench/table.py --out "$OUT" ${BENCH_ARGS:-} >"$OUT/bench.log" 2>&1
  echo "== bench rc=$?"; grep -E "sample|read scores|sgd|truncate" "$OUT/bench.log" | grep -v "^  {" | grep -v reference
fi
