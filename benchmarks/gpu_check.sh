#!/usr/bin/env bash
# The GPU check for a lent GPU machine (torch, triton and timm installed there), in at most
# 9 minutes by construction (the step timeouts add up to the budget): see
# benchmarks/gpu_check.py (steps in order of value, --sanitize, --dry-run). Everything lands
# in $OUT (default ./gpu_out): gpu_check.tar.gz and summary.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
exec python benchmarks/gpu_check.py --out "${OUT:-gpu_out}" "$@"
