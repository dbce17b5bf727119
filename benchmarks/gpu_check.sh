#!/usr/bin/env bash
# The GPU check for a lent GPU machine (torch, triton and timm installed there), in at most
# 8 minutes by construction: see benchmarks/gpu_check.py (steps, timeouts, --sanitize,
# --dry-run). Everything lands in $OUT (default ./gpu_out): gpu_check.tar.gz and summary.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
exec python benchmarks/gpu_check.py --out "${OUT:-gpu_out}" "$@"
