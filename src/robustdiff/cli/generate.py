"""robustdiff-generate: sample N class-balanced images from an EDM network into a generated-data store.

    robustdiff-generate network=runs/edm/<run>/network.pt n=10000 out=data/generated/fmnist-10k steps=18
    robustdiff-generate network=edm-cifar10-32x32-cond-vp.pkl dataset=cifar10 n=1000000 steps=20 \\
        out=data/generated/c10-1m classifier=runs/<trades run> keep_fraction=0.2 trainer=gpu trainer.devices=8

What is generated (docs/method.md, "The generator (EDM)"): image i (0 ≤ i < N) has label i mod K and starts from noise drawn from its
own generator, seeded by (seed, i) — so the images do not depend on the batch size or the number of
processes. N must be a multiple of K (exactly N/K images per class). The store uses the block layout
(``robustdiff.data.store``): shard b holds images [b·S, (b+1)·S); processes take disjoint runs of
shards, write them atomically, and rank 0 assembles the manifest at the end. An interrupted run keeps
its finished shards: rerunning the same command writes only the missing ones, and the result is the
same bytes as an uninterrupted run (the batches of a shard are the same either way).

``seeding=nvidia`` instead reproduces NVIDIA's ``generate.py --seeds=<seed>-<seed+N−1>`` image for image
(``robustdiff.diffusion.sampler``): image i comes from seed ``seed + i`` on the sampling device, with the class
label that seed draws — so the store is not class-balanced (any N; the manifest's ``class_counts`` are the
real counts and its provenance records ``seeding``), and classifier filtering is not available with it.

Filtering (the paper's 1M CIFAR sets): with ``classifier=`` and ``keep_fraction=f`` we first generate
M = ceil(N / f) candidates, rounded up to a multiple of K, into ``candidates`` (default ``<out>-candidates``,
kept afterwards), score each by the classifier's softmax probability of its generating class, and
keep per class the N/K most confident (ties: lower index first), in candidate order, in ``out``.
The classifier is a robustdiff-train run directory of any architecture (model.pt + run.json), its
``robustdiff-eval export``, or a WideResNet state dict (.pt; then ``dataset=`` names its normalisation).

Networks: ``network.pt`` from robustdiff-edm (weights-only load) or NVIDIA's EDM ``.pkl`` (restricted
unpickler, ``robustdiff.diffusion.pretrained``). Multi-GPU runs use Lightning Fabric (``trainer=`` group).

W&B (off by default; ``logger=wandb logger.project=<name>`` as robustdiff-train, extra ``robustdiff[wandb]``):
rank 0 logs one run of
job_type ``generate`` named after ``out``, its config the settings and the store's provenance, images/s and
progress per finished shard, then the per-class counts and a grid of the first images of each class of the
finished store. ``wandb.json`` in the store being written (``out``, or the candidates when filtering) records
the run id, so a resumed generation logs into the same W&B run. A W&B failure is a warning, never lost images.

Exit status: 0 done, 2 bad input, 128 + N stopped by signal N (SIGTERM, SIGUSR1, Ctrl-C) after the shard it was
sampling: rerun the same command to finish.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from .hydra_conf import CONFIG_PATH, run_hydra_command, task_started


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="generate")
def _hydra_main(cfg: DictConfig) -> None:
    task_started()
    from ..conf.compose import primary_keys
    from ..training.config import ConfigError, check_keys  # no torch: a typo'd key is answered at once

    try:
        check_keys(cfg, primary_keys("generate"), "robustdiff-generate", "would be ignored")
    except ConfigError as e:
        print(f"robustdiff-generate: error: {e}", file=sys.stderr)
        sys.exit(2)
    # Imported here, not at the top: --help, --cfg, --info and completion need none of torch/Lightning.
    from ..data.datasets import DatasetError
    from ..data.store import StoreError
    from ..diffusion import generate as generation

    try:
        result = generation.generate(cfg)
    except (generation.GenerationError, StoreError, DatasetError) as e:
        print(f"robustdiff-generate: error: {e}", file=sys.stderr)
        sys.exit(2)
    if result and result.get("stopped"):  # a stop signal: finished shards kept, the same command resumes
        sys.exit(128 + result["signal"] if result.get("signal") else 1)


def main() -> None:
    run_hydra_command("robustdiff-generate", _hydra_main, "choose a writable out=<dir>")


if __name__ == "__main__":
    main()
