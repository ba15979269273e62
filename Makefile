# robustdiff — set-up, tests, demo and benchmarks. Every target installs what it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU machines use the pinned build; on a GPU cluster: make install TORCH="torch torchvision"
TORCH ?= torch==2.14.1 torchvision==0.29.1
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install data test test-fast demo study study-v2 study-v2-generator lint bench bench-data bench-edm bench-eval bench-train gpu-bundle gpu-check

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

# Fashion-MNIST, the embedded default dataset: Debian's package where apt-get exists, else torchvision's
# downloader into data/FashionMNIST/raw (where robustdiff looks with the default data_dir=data).
FMNIST_TV := data/FashionMNIST/raw/train-images-idx3-ubyte
data:
	@if [ -f $(FMNIST) ] || [ -f $(FMNIST_TV) ]; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ -f /etc/debian_version ]; then \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist; \
	else \
	  $(MAKE) install && $(PY) -c "from torchvision.datasets import FashionMNIST as F; [F('data', train=t, download=True) for t in (True, False)]"; \
	fi

test: install data
	$(PY) -m pytest -q

# The suite without the end-to-end tests marked slow (long training, DDP, sweeps, studies, the demo, compile).
test-fast: install data
	$(PY) -m pytest -q -m "not slow"

# The whole pipeline on Fashion-MNIST on a CPU: EDM -> generated store -> TRADES without/with it -> attack -> report.
demo: install data
	$(VENV)/bin/robustdiff-demo --out runs/demo

lint: install
	$(VENV)/bin/ruff check src tests benchmarks

# Every benchmark, then one table of the headline figures (ARGS: --quick, --only train,edm, --out FILE).
bench: install data
	$(PY) benchmarks/run_all.py $(ARGS)

bench-data: install
	$(PY) benchmarks/bench_data.py $(ARGS)

bench-edm: install
	$(PY) benchmarks/bench_edm.py $(ARGS)

bench-eval: install data
	$(PY) benchmarks/bench_eval.py $(ARGS)

bench-train: install data
	$(PY) benchmarks/bench_train.py $(ARGS)

# Here, once: the wheels the GPU machine lacks (CPython $(GPU_PYTHON_VERSION)) and Fashion-MNIST, into gpu_bundle/.
GPU_PYTHON_VERSION ?= 3.12
gpu-bundle: install data
	GPU_PYTHON_VERSION=$(GPU_PYTHON_VERSION) PYTHON=$(PY) bash benchmarks/gpu_bundle.sh

# One H100/H200, at most 8 minutes: the math and the real entry points on CUDA (`ARGS=--smoke`: every stage on
# a CPU at toy size). On the device machine without `make install`: bash benchmarks/gpu_check.sh (uses gpu_bundle/).
gpu-check: install
	bash benchmarks/gpu_check.sh $(ARGS)

# The generator-quality study (experiments/README.md): ~2 h on this CPU, resumable; ARGS=--report-only.
study: install data
	$(VENV)/bin/robustdiff-study experiments/study/fmnist_quality.yaml --out runs/study $(ARGS)

# The v2 study (experiments/README.md, "v2 protocol"): ~4 h on a 2-core CPU, resumable. Two cores: run
# `make study-v2 ARGS=--arms=real-s0,real-s1,real-s2` beside `make study-v2` once the classifiers exist.
study-v2: install data
	$(VENV)/bin/robustdiff-study experiments/study/fmnist_v2.yaml --out runs/v2 $(ARGS)

# The v2 study's shipped generators (experiments/study/generators/fmnist_v2), retrained from their recorded command
# and compared byte for byte with the shipped snapshots (~2.5 h on a 2-core CPU; rerun to resume).
study-v2-generator: install data
	OMP_NUM_THREADS=1 $(PY) experiments/study/retrain_generator.py experiments/study/generators/fmnist_v2 \
	    --out runs/v2-generator $(ARGS)
