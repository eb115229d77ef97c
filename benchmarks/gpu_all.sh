#!/usr/bin/env bash
# Every GPU check of the repository in one go, on one CUDA machine:
#   bash benchmarks/gpu_all.sh [flashattn fusedops gemm]
# Works without uv or an install (the packages are put on PYTHONPATH). Each package's script
# runs its GPU-marked tests, then its benchmarks, and writes its tables into docs/benchmarks/.
# Scripts run one after the other so that timings don't share the GPU. If $OUT is set (the
# device runner), logs and tables are copied there.
set -u
cd "$(dirname "$0")/.."
PYTHONPATH="$(ls -d "$PWD"/packages/*/src | tr '\n' ':')$PWD"
export PYTHONPATH PYTHONUNBUFFERED=1
out="${OUT:-/tmp/haillm-gpu}"
mkdir -p "$out"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)"
} > "$out/gpu.txt" 2>&1
cat "$out/gpu.txt"
scripts=("$@")
[ ${#scripts[@]} -gt 0 ] || scripts=(flashattn fusedops gemm)
status=0
for s in "${scripts[@]}"; do
  limit_var="LIMIT_${s}"
  limit="${!limit_var:-300}"
  echo "=== gpu_$s.py (limit ${limit}s) ==="
  start=$(date +%s)
  timeout "$limit" python "benchmarks/gpu_$s.py" > "$out/log_$s.txt" 2>&1 || { echo "gpu_$s.py exit $?"; status=1; }
  echo "=== gpu_$s.py took $(( $(date +%s) - start ))s; last lines: ==="
  tail -n 40 "$out/log_$s.txt"
done
# The remaining GPU-marked tests (packages without a benchmark script of their own).
echo "=== pytest -m gpu tests/zero tests/parallel tests/pipeline tests/trainer tests/test_harness.py ==="
timeout "${LIMIT_rest:-180}" python -m pytest -q -m gpu -p no:cacheprovider -o addopts= \
  tests/zero tests/parallel tests/pipeline tests/trainer tests/test_harness.py \
  > "$out/log_rest.txt" 2>&1 || { echo "remaining GPU tests: exit $?"; status=1; }
tail -n 15 "$out/log_rest.txt"
for page in flashattn fusedops fusedops-gemm; do
  [ -f "docs/benchmarks/$page.md" ] && cp "docs/benchmarks/$page.md" "$out/$page.md"
done
exit $status
