#!/usr/bin/env bash
# The one-card GPU check: the math (WRN-28-10 TRADES fp32/bf16/channels_last/compile, bf16 peak,
# EDM sampling) and robustdiff's real entry points on CUDA (train + resume, compile, DDP/NCCL, generate +
# store verify, AutoAttack). Stages and sizes: benchmarks/gpu_pipeline.py. Results: $OUT/gpu_check.json
# (rewritten after every stage) and gpu_check.log beside it.
#   make gpu-bundle                              # here, once: wheels + Fashion-MNIST into gpu_bundle/
#   bash benchmarks/gpu_check.sh                 # on the GPU machine (carry gpu_bundle), < 8 minutes
#   bash benchmarks/gpu_check.sh --smoke         # every stage on a CPU at toy size
# Options go to gpu_pipeline.py (--stages train,eval --budget-s 300 --out FILE); others to gpu_check.py.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/gpu_env.sh"  # root, py, bundle
site="${GPU_SITE:-/tmp/robustdiff-site}"
# What the GPU machine lacks (hydra-core, omegaconf, antlr4, pyautoattack) comes from the bundle's wheels,
# installed offline; a machine that has them (this one, a cluster) skips this.
if ! "$py" -c "import hydra, omegaconf, pyautoattack" 2>/dev/null; then
  if ! ls "$bundle"/wheels/*.whl >/dev/null 2>&1; then
    echo "gpu_check: hydra/omegaconf/pyautoattack are not importable and $bundle/wheels has no wheels:" \
         "run 'make gpu-bundle' on a machine with a package registry and carry gpu_bundle/ here" >&2
    exit 2
  fi
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
    "$bundle"/wheels/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$root/src${PYTHONPATH:+:$PYTHONPATH}"
# Hard stop at 8 minutes (smoke: 30); the JSON is rewritten after every stage, so a cut run keeps its results.
limit="${GPU_CHECK_TIMEOUT:-480}"
case " $* " in *" --smoke "*) limit="${GPU_CHECK_TIMEOUT:-1800}" ;; esac
exec timeout --signal=TERM --kill-after=20 "$limit" "$py" "$root/benchmarks/gpu_pipeline.py" "$@"
