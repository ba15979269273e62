#!/usr/bin/env bash
# Gather, on a machine with a package registry, what the GPU machine lacks for benchmarks/gpu_check.sh,
# into gpu_bundle/ (git-ignored; carry it to the GPU machine with the working tree, 64 MiB in all):
#   wheels/  hydra-core, omegaconf, antlr4-python3-runtime (robustdiff-train/-generate compose Hydra configs)
#            and pyautoattack (robustdiff-eval's AutoAttack): pure-Python wheels for CPython $GPU_PYTHON_VERSION.
#            The GPU image already has torch, pytorch-lightning, torchmetrics, numpy, PyYAML, packaging, tqdm;
#            wandb is not needed (the check logs with logger=csv) and robustdiff itself runs from src/.
#   data/fashionmnist/  the four Fashion-MNIST idx .gz files (robustdiff-train's real data there).
# Usage: make gpu-bundle [GPU_PYTHON_VERSION=3.12]   or   bash benchmarks/gpu_bundle.sh
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/gpu_env.sh"  # root, py, bundle
pyver="${GPU_PYTHON_VERSION:-3.12}"
# The versions this project's environment uses (pyproject: hydra-core >=1.3.4,<1.4; omegaconf >=2.3; pyautoattack >=0.2).
wheels="${GPU_WHEELS:-hydra-core==1.3.8 omegaconf==2.3.1 pyautoattack==0.2.0}"
antlr="${GPU_ANTLR:-antlr4-python3-runtime==4.9.3}"  # omegaconf 2.3 / hydra 1.3 need 4.9.x, published as an sdist only
fmnist="${FMNIST_DIR:-/usr/share/datasets/fashion-mnist}"
max_mib="${GPU_BUNDLE_MAX_MIB:-50}"

mkdir -p "$bundle/wheels" "$bundle/data/fashionmnist"
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
# shellcheck disable=SC2086
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
  "${platforms[@]}" -d "$bundle/wheels" $wheels
if ! ls "$bundle"/wheels/antlr4_python3_runtime-*.whl >/dev/null 2>&1; then
  if ! "$py" -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
       "${platforms[@]}" -d "$bundle/wheels" "$antlr" 2>/dev/null; then
    # Pure Python: a wheel built here from the sdist installs on any CPython 3.
    "$py" -m pip wheel -q --no-deps -w "$bundle/wheels" "$antlr"
  fi
fi
# pyautoattack's wheel carries 44 MB of example weights (pyautoattack/examples/) that the package never imports:
# repack it without them (and without their RECORD lines), or the bundle would not fit the 64 MiB that travel.
"$py" - "$bundle"/wheels/pyautoattack-*.whl <<'PY'
import sys, zipfile, os
for path in sys.argv[1:]:
    with zipfile.ZipFile(path) as src:
        names = [n for n in src.namelist() if "/examples/" not in n]
        if len(names) == len(src.namelist()):
            continue
        tmp = path + ".tmp"
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
            for n in names:
                data = src.read(n)
                if n.endswith(".dist-info/RECORD"):
                    data = b"".join(line for line in data.splitlines(keepends=True) if b"/examples/" not in line)
                dst.writestr(src.getinfo(n), data)
    os.replace(tmp, path)
    print(f"gpu_bundle: {os.path.basename(path)}: dropped pyautoattack/examples/ (example weights, not imported)")
PY
for f in train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz; do
  if [ ! -f "$fmnist/$f" ]; then
    echo "gpu_bundle: $fmnist/$f is missing: install Debian's dataset-fashion-mnist (make data) or set FMNIST_DIR" >&2
    exit 2
  fi
  cp -p "$fmnist/$f" "$bundle/data/fashionmnist/$f"
done

# Every wheel must be pure Python or for this CPython: a wrong one would only fail on the GPU machine.
tag="cp${pyver/./}"
for w in "$bundle"/wheels/*.whl; do
  case "$(basename "$w")" in
    *-py3-none-any.whl|*-py2.py3-none-any.whl|*-"$tag"-*manylinux*x86_64*.whl) ;;
    *) echo "gpu_bundle: $w is not a pure-Python or $tag x86-64 wheel; remove it" >&2; exit 2 ;;
  esac
done
echo "gpu_bundle: $bundle"
(cd "$bundle" && find . -type f -printf '%s %p\n' | sort -k2 | awk '{printf "  %8.1f KiB  %s\n", $1 / 1024, $2}')
total=$(du -sb "$bundle" | cut -f1)
echo "  total $(awk -v b="$total" 'BEGIN {printf "%.1f", b / 1048576}') MiB (limit ${max_mib} MiB; the working tree travels with it, 64 MiB in all)"
if [ "$total" -gt $((max_mib * 1048576)) ]; then
  echo "gpu_bundle: $bundle is larger than ${max_mib} MiB; remove what the check does not need" >&2
  exit 1
fi
