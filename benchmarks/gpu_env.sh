# Sourced by gpu_bundle.sh and gpu_check.sh: the checkout root, the Python to use ($PYTHON, else the project's
# .venv, else python3) and the bundle folder ($GPU_BUNDLE, else gpu_bundle/ in the checkout).
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${PYTHON:-}"
if [ -z "$py" ]; then
  if [ -x "$root/.venv/bin/python" ]; then py="$root/.venv/bin/python"; else py=python3; fi
fi
bundle="${GPU_BUNDLE:-$root/gpu_bundle}"
