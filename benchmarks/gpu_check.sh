#!/usr/bin/env bash
# One-card GPU performance check (WRN-28-10 TRADES fp32/bf16/compile, bf16 peak, EDM sampling).
# Run from anywhere; uses the repository's src/ (no install, no downloads). Results: $OUT/gpu_check.json.
#   bash benchmarks/gpu_check.sh              # on one H100/H200, < 8 minutes
#   bash benchmarks/gpu_check.sh --smoke      # CPU, seconds
# Extra arguments go to gpu_check.py (e.g. --configs fp32,bf16 --budget-s 300).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${PYTHON:-}"
if [ -z "$py" ]; then
  if [ -x "$root/.venv/bin/python" ]; then py="$root/.venv/bin/python"; else py=python3; fi
fi
export PYTHONPATH="$root/src${PYTHONPATH:+:$PYTHONPATH}"
# Hard stop at 8 minutes; the JSON is rewritten after every measurement, so a cut run keeps its results.
exec timeout --signal=TERM --kill-after=10 "${GPU_CHECK_TIMEOUT:-480}" "$py" "$root/benchmarks/gpu_check.py" "$@"
