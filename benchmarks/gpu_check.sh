#!/usr/bin/env bash
# The whole GPU check in one command, for a lent GPU machine (torch, triton and timm already
# installed there): build with CUDA kernels, run the test suite (the CUDA tests run instead
# of skipping), then every benchmark. Logs and CSVs go to $OUT (default ./gpu_out).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi > "$OUT/nvidia_smi.txt" 2>&1
pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
dcvit doctor 2>&1 | tee "$OUT/doctor.txt"
python -m pytest tests -q -x -m "not slow" 2>&1 | tee "$OUT/tests.log" | tail -30
for bench in benchmarks/bench_*.py; do
  name=$(basename "$bench" .py)
  echo "== $name"
  python "$bench" --out "$OUT" 2>&1 | tee "$OUT/$name.log" | tail -40
done
