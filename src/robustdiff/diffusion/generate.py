"""Generation of a class-balanced store of EDM samples: the job behind robustdiff-generate.

`generate(cfg)` runs the job described by a composed ``conf/generate.yaml`` on any number of processes
(Lightning Fabric). Image i (0 ≤ i < N) has label i mod K and starts from noise of its own generator, seeded by
(seed, i), so the images do not depend on the batch size or the number of processes (``seeding=nvidia``
reproduces NVIDIA's ``generate.py`` seeds instead: ``robustdiff.diffusion.sampler``). The store uses the block
layout of ``robustdiff.data.store``: processes take disjoint runs of shards, write them atomically (on a
background thread, ``robustdiff.diffusion.shards``), and rank 0 assembles the manifest at the end. An interrupted
job keeps its finished shards: running it again writes only the missing ones, and the result is the same bytes as
an uninterrupted job.

With ``classifier=`` and ``keep_fraction=f`` the job first generates ceil(N / f) candidates, scores each, and
keeps per class the most confident (``robustdiff.diffusion.selection``). Settings are checked before any work
(``robustdiff.diffusion.generation_inputs``); W&B logging is ``robustdiff.diffusion.generation_wandb``.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from ..conf.compose import primary_keys
from ..data.store import (
    StoreError,
    assemble_block_store,
    block_ranges,
    finished_blocks,
    open_block_store,
)
from ..training.config import ConfigError, check_keys
from ..utils.io import file_sha256
from ..utils.signals import StopSignals
from .generation_inputs import (
    AUTOCAST,
    GenerationError,
    load_classifier,
    load_generator,
    plan,
    provenance,
    same_generation,
    sampler_kwargs,
)
from .generation_wandb import GenerationWandb, wandb_settings
from .selection import confidence, select_confident
from .shards import ShardWriter, scores_path, write_shard

__all__ = ["GenerationError", "generate", "run_generation"]


def run_generation(fabric, cfg: dict) -> dict | None:
    """Body of one process (rank). Returns the final manifest on rank 0 (None on the others), or
    ``{"stopped": True, "signal", "shards_written"}`` when a stop signal ended it early."""
    log = GenerationWandb(cfg if fabric.global_rank == 0 else {})
    try:
        result = _run_generation(fabric, cfg, log)
    except BaseException:
        log.close(exit_code=1)
        raise
    log.close()
    return result


def _run_generation(fabric, cfg: dict, log: GenerationWandb) -> dict | None:
    import torch
    from tqdm import tqdm

    from ..data.datasets import get_info
    from .sampler import sample_images

    device = fabric.device
    net, net_format = load_generator(cfg["network"], device)
    K = int(net.label_dim)
    if K == 0:
        raise GenerationError(f"network={cfg['network']}: is unconditional (label_dim 0); the store needs labels, "
                              f"so use a class-conditional network")
    shape = (net.img_resolution, net.img_resolution, net.img_channels)
    if cfg["dataset"] is not None:
        info = get_info(cfg["dataset"])
        if info.num_classes != K or tuple(info.image_shape) != shape:
            raise GenerationError(
                f"network={cfg['network']}: generates {K} classes of {'×'.join(map(str, shape))} images but dataset "
                f"{info.name} has {info.num_classes} classes of {'×'.join(map(str, info.image_shape))} — use a "
                f"network trained on {info.name}, or drop dataset=")
    job = plan(cfg, K)
    classifier = None
    if job["filter"]:
        classifier = load_classifier(cfg["classifier"], cfg["dataset"], K, shape[2], device)
    target: Path = job["target"]
    autocast = getattr(torch, AUTOCAST[cfg["precision"]]) if AUTOCAST[cfg["precision"]] else None
    kwargs = sampler_kwargs(cfg)
    if cfg.get("compile"):
        # Only the U-Net: the preconditioning and the float64 solver stay eager. Sampling only, nothing is saved.
        mode = None if cfg["compile"] is True else cfg["compile"]
        net.model = torch.compile(net.model, mode=mode, dynamic=False)

    # Rank 0 creates (or checks) the store; every rank then takes its share of the missing shards.
    pending: list[int] | Exception = []
    if fabric.global_rank == 0:
        try:
            sha = file_sha256(cfg["network"])
            prov = same_generation(target, provenance(cfg, net, net_format, sha, job["count"]))
            manifest = open_block_store(target, job["count"], shape, K, cfg["shard_size"], prov)
            if not manifest["complete"] or job["filter"]:  # complete candidates may still lack scores (a store
                done = set(finished_blocks(target))          # generated without selection, then selected from)
                if job["filter"]:
                    done = {b for b in done if scores_path(target, b).is_file()}
                pending = [b for b in range(len(block_ranges(job["count"], cfg["shard_size"]))) if b not in done]
        except (StoreError, GenerationError) as e:
            pending = e
        if not isinstance(pending, Exception):
            log.start(target, prov, fabric.world_size)
    pending = fabric.broadcast(pending, src=0)
    if isinstance(pending, Exception):
        raise pending
    mine = [int(b) for b in np.array_split(np.asarray(pending, dtype=np.int64), fabric.world_size)[fabric.global_rank]]
    ranges = block_ranges(job["count"], cfg["shard_size"])
    total = sum(ranges[b][1] - ranges[b][0] for b in mine)
    bar = tqdm(total=total, unit="img", desc=f"generate → {target.name}" + (
        f" (rank 0 of {fabric.world_size})" if fabric.world_size > 1 else ""),
        disable=fabric.global_rank != 0 or not cfg["progress"], dynamic_ncols=True)
    start_time = time.perf_counter()
    written = 0
    on_disk = set(finished_blocks(target)) if mine else set()
    writer = ShardWriter()  # shard b is written while shard b+1 samples
    # SIGTERM / SIGUSR1 / Ctrl-C: the shard being sampled is finished and written, then the job stops; every
    # finished shard stays, and the same command writes only the missing ones.
    try:
        with bar, StopSignals("the end of this shard") as stop:
            for b in mine:
                a, z = ranges[b]
                shard_start = time.perf_counter()
                if b in on_disk:  # images on disk, only the scores are missing
                    images = np.fromfile(target / f"shard-{b:05d}.images.u8", dtype=np.uint8).reshape(z - a, *shape)
                    labels = np.fromfile(target / f"shard-{b:05d}.labels.i64", dtype="<i8")
                    bar.update(z - a)
                else:
                    parts, label_parts = [], []
                    for s in range(a, z, cfg["batch_size"]):  # batches aligned to the shard: same bytes on resume
                        x, y = sample_images(net, range(s, min(s + cfg["batch_size"], z)), K, seed=cfg["seed"],
                                             num_steps=cfg["steps"], batch_size=cfg["batch_size"], device=device,
                                             autocast_dtype=autocast, seeding=cfg.get("seeding", "robustdiff"),
                                             **kwargs)
                        parts.append(x)
                        label_parts.append(y)
                        bar.update(len(y))
                    images, labels = np.concatenate(parts), np.concatenate(label_parts)
                scores = None
                if classifier is not None:
                    scores = confidence(classifier, images, labels, cfg["classifier_batch_size"], device)
                fresh = b not in on_disk  # a shard already on disk only gets its scores written
                writer.submit(write_shard, target, b, images if fresh else None, labels, scores)
                log.shard(b, (z - a) if fresh else 0, time.perf_counter() - shard_start)
                written += 1
                if stop.received is not None:
                    break
    finally:
        writer.close()
    elapsed = time.perf_counter() - start_time
    stopped = fabric.all_reduce(torch.tensor(float(written < len(mine)), device=device), reduce_op="max")
    fabric.barrier()
    if float(stopped) > 0:
        if fabric.global_rank == 0:
            print(f"robustdiff-generate: stopped by a signal after {written} shard(s) on rank 0; rerun the same "
                  f"command to finish {target}")
        return {"stopped": True, "signal": stop.received, "shards_written": written}
    if fabric.global_rank != 0:
        return None
    if total:
        print(f"robustdiff-generate: {total} images in {elapsed:.1f} s on rank 0 ({total / elapsed:.1f} img/s)")
    manifest = assemble_block_store(target)
    if job["filter"]:
        manifest = select_confident(target, Path(cfg["out"]), cfg, cfg["n"], K)
    counts = manifest["class_counts"]
    per_class = (f"{counts[0]} per class" if len(set(counts)) == 1
                 else f"per class {counts} (seeding={cfg.get('seeding')}: NVIDIA's random labels)")
    print(f"robustdiff-generate: {cfg['out']}: {manifest['count']} images, {per_class}")
    log.done(manifest, Path(cfg["out"]), total, elapsed)
    return manifest


def generate(cfg: DictConfig | dict) -> dict | None:
    """Run the generation job described by a composed ``conf/generate.yaml`` (any number of processes).
    Returns rank 0's final manifest, or ``{"stopped": True, "signal": N, "shards_written": k}`` when SIGTERM,
    SIGUSR1 or Ctrl-C stopped it after the shard it was sampling (rerun the same command to finish)."""
    from lightning_fabric import Fabric

    cfg = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    try:  # +steps=18 for steps=18: a typo, refused, not a silently ignored setting
        check_keys(cfg, primary_keys("generate"), "robustdiff-generate", "would be ignored")
    except ConfigError as e:
        raise GenerationError(str(e)) from None
    dataset = cfg.get("dataset")  # the dataset group ({name: ...}) or a plain name
    cfg["dataset"] = dataset.get("name") if isinstance(dataset, dict) else dataset
    for key in ("network", "n", "out"):
        if cfg.get(key) in (None, "???"):
            raise GenerationError(f"{key}=... is required (e.g. network=runs/edm/<run>/network.pt n=10000 "
                                  f"out=data/generated/fmnist-10k)")
    wandb_settings(cfg)  # a bad wandb.mode or a missing wandb package: refused before any work
    t = cfg["trainer"]
    from ..training.trainer import is_launching_process
    from ..utils.lock import DirectoryLock, DirectoryLockedError

    locks = []
    if is_launching_process():  # one generation per store (the ranks it starts don't take the lock)
        out = Path(cfg["out"])
        targets = [out]
        if cfg.get("classifier"):
            targets.append(Path(cfg["candidates"]) if cfg.get("candidates") else out.with_name(out.name + "-candidates"))
        try:
            locks = [DirectoryLock(p, "robustdiff-generate").acquire() for p in targets]
        except DirectoryLockedError as e:
            for lock in locks:
                lock.release()
            raise GenerationError(str(e)) from None
    try:
        fabric = Fabric(accelerator=t["accelerator"], devices=t["devices"], strategy=t["strategy"],
                        num_nodes=t["num_nodes"])
        return fabric.launch(run_generation, cfg)
    finally:
        for lock in locks:
            lock.release()
