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
The classifier is a robustdiff-train run directory (model.pt + run.json) or a WideResNet state dict
(.pt; then ``dataset=`` names its normalisation).

Networks: ``network.pt`` from robustdiff-edm (weights-only load) or NVIDIA's EDM ``.pkl`` (restricted
unpickler, ``robustdiff.diffusion.pretrained``). Multi-GPU runs use Lightning Fabric (``trainer=`` group).

W&B (off by default; ``wandb.project=<name>`` turns it on, extra ``robustdiff[wandb]``): rank 0 logs one run of
job_type ``generate`` named after ``out``, its config the settings and the store's provenance, images/s and
progress per finished shard, then the per-class counts and a grid of the first images of each class of the
finished store. ``wandb.json`` in the store being written (``out``, or the candidates when filtering) records
the run id, so a resumed generation logs into the same W&B run. A W&B failure is a warning, never lost images.

Exit status: 0 done (or stopped by ``stop_after_shards``), 2 bad input.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf

from ..data.datasets import DatasetError
from ..data.store import (
    MANIFEST,
    GeneratedStore,
    StoreError,
    StoreWriter,
    assemble_block_store,
    block_ranges,
    finished_blocks,
    open_block_store,
    write_block,
)
from ..utils.extras import missing_extra
from ..utils.io import UnreadableWeightsError, atomic_path, file_sha256, load_weights
from .hydra_conf import CONFIG_PATH, run_hydra_command, task_started

# torch is imported inside the functions that use it: --help, --cfg and completion answer without it.
if TYPE_CHECKING:
    import torch

SCORES_DIR = "scores"


class GenerationError(ValueError):
    """Bad input to robustdiff-generate; the message names the file or field and the fix."""


# ---------------------------------------------------------------------------------------------------- inputs


def load_generator(path: str | os.PathLike, device: torch.device | str = "cpu"):
    """EDM network from a robustdiff ``network.pt`` or an NVIDIA ``.pkl``. Returns (net, format name)."""
    from ..diffusion.pretrained import PretrainedError, load_edm_pickle
    from ..training.diffusion import NetworkFileError, load_network

    path = Path(path)
    if not path.is_file():
        raise GenerationError(f"network={path}: no such file (a robustdiff-edm network.pt or an NVIDIA EDM .pkl)")
    try:
        if path.suffix == ".pkl":
            net, _ = load_edm_pickle(path, device=device)
            return net, "nvidia-edm-pkl"
        net, _ = load_network(path, device=device)
        return net, "robustdiff-network"
    except (PretrainedError, NetworkFileError) as e:
        said = str(e).removeprefix(f"{path}: ")  # the loaders name the file themselves: say it once
        raise GenerationError(f"network={path}: {said}") from e


def load_classifier(path: str | os.PathLike, dataset: str | None, num_classes: int, channels: int,
                    device: torch.device | str = "cpu") -> torch.nn.Module:
    """WideResNet from a robustdiff-train run directory (model.pt + run.json) or a WRN state-dict .pt."""

    from ..data.datasets import get_info
    from ..models.wrn import WideResNet

    path = Path(path)
    if path.is_dir():
        run_json, weights = path / "run.json", path / "model.pt"
        if not run_json.is_file() or not weights.is_file():
            raise GenerationError(f"classifier={path}: a run directory needs run.json and model.pt "
                                  f"(written by robustdiff-train)")
        run = json.loads(run_json.read_text())
        dataset = run["dataset"]
    elif path.is_file():
        weights = path
        if dataset is None:
            raise GenerationError(f"classifier={path}: a plain state dict does not say how to normalise its inputs — "
                                  f"pass dataset=<name> (its mean/std are used)")
    else:
        raise GenerationError(f"classifier={path}: no such file or run directory")
    try:
        state = load_weights(weights, "a classifier state dict")
    except UnreadableWeightsError as e:
        raise GenerationError(f"classifier={e}") from None
    for key in ("state_dict", "model"):  # common wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or "logits.weight" not in state or "init_conv.weight" not in state:
        raise GenerationError(f"classifier={weights}: not a WideResNet state dict (no init_conv/logits weights)")
    blocks = {k.split(".")[3] for k in state if k.startswith("layer.0.block.")}
    width = state["layer.0.block.0.conv_0.weight"].shape[0] // 16
    info = get_info(dataset)
    model = WideResNet(depth=6 * len(blocks) + 4, width=width, num_classes=state["logits.weight"].shape[0],
                       in_channels=state["init_conv.weight"].shape[1], mean=info.mean, std=info.std)
    if model.num_classes != num_classes or model.in_channels != channels:
        raise GenerationError(f"classifier={weights}: has {model.num_classes} classes and {model.in_channels} input "
                              f"channels, but the network generates {num_classes} classes of {channels}-channel images")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise GenerationError(f"classifier={weights}: does not load into a WRN-{model.depth}-{width}: {e}") from e
    return model.eval().to(device)


def plan(cfg: dict, num_classes: int) -> dict[str, Any]:
    """Counts and paths of the job (checks that must fail before any work)."""
    from ..diffusion.sampler import SEEDINGS
    from ..utils.hardware import COMPILE_CHOICES, COMPILE_MODES

    n, keep = cfg["n"], cfg["keep_fraction"]
    seeding = cfg.get("seeding", "robustdiff")
    if seeding not in SEEDINGS:
        raise GenerationError(f"seeding={seeding!r}: choose robustdiff (class-balanced, the default) or nvidia "
                              f"(NVIDIA generate.py's images and random labels for seeds seed..seed+n-1)")
    if not isinstance(n, int) or n < 1:
        raise GenerationError(f"n={n!r} must be a positive integer")
    if seeding == "nvidia" and cfg["classifier"] is not None:
        raise GenerationError(f"classifier={cfg['classifier']} with seeding=nvidia: filtering keeps n/K images per "
                              f"class, but NVIDIA's seeding draws random labels — use seeding=robustdiff to filter")
    if n % num_classes and seeding == "robustdiff":
        lo, hi = n - n % num_classes, n + num_classes - n % num_classes
        raise GenerationError(f"n={n} is not a multiple of the network's {num_classes} classes, so the classes "
                              f"cannot be exactly balanced — use n={lo or hi} or n={hi}")
    for key in ("steps", "batch_size", "shard_size"):
        if not isinstance(cfg[key], int) or cfg[key] < 1:
            raise GenerationError(f"{key}={cfg[key]!r} must be a positive integer")
    if not isinstance(cfg["seed"], int) or not 0 <= cfg["seed"] < 2 ** 63:
        raise GenerationError(f"seed={cfg['seed']!r} must be an integer in [0, 2**63)")
    if cfg.get("compile", False) not in COMPILE_CHOICES:
        raise GenerationError(f"compile={cfg.get('compile')!r}: choose false, true or a torch.compile mode "
                              f"({', '.join(COMPILE_MODES)})")
    cfg["precision"] = PRECISION_ALIASES.get(cfg["precision"], cfg["precision"])
    if cfg["precision"] not in AUTOCAST:
        raise GenerationError(f"precision={cfg['precision']!r}: choose 32-true, bf16-mixed or 16-mixed (as "
                              f"robustdiff-train; short forms {', '.join(AUTOCAST)})")
    out = Path(cfg["out"])
    if cfg["classifier"] is None:
        if keep != 1:
            raise GenerationError(f"keep_fraction={keep} needs a classifier=... to rank the candidates")
        return {"count": n, "target": out, "filter": False}
    if not 0 < float(keep) <= 1:
        raise GenerationError(f"keep_fraction={keep} must be in (0, 1]")
    per_class = math.ceil(math.ceil(n / float(keep)) / num_classes)
    candidates = Path(cfg["candidates"]) if cfg["candidates"] else out.with_name(out.name + "-candidates")
    return {"count": per_class * num_classes, "target": candidates, "filter": True}


def provenance(cfg: dict, net, net_format: str, sha256: str, count: int) -> dict[str, Any]:
    s = cfg["sampler"]
    return {
        "generator": {"file": str(Path(cfg["network"]).resolve()), "sha256": sha256, "format": net_format,
                      "class": type(net).__name__, "img_resolution": net.img_resolution,
                      "img_channels": net.img_channels, "label_dim": net.label_dim},
        "sampler": {"name": "edm_heun", "num_steps": cfg["steps"], "sigma_min": s["sigma_min"],
                    "sigma_max": s["sigma_max"], "rho": s["rho"], "S_churn": s["S_churn"], "S_min": s["S_min"],
                    "S_max": s["S_max"], "S_noise": s["S_noise"], "precision": cfg["precision"]},
        "seed": cfg["seed"],
        "n": count,
        **_seeding_provenance(cfg.get("seeding", "robustdiff")),
    }


def _seeding_provenance(seeding: str) -> dict[str, str]:
    if seeding == "nvidia":
        return {"seeding": "nvidia",
                "seeds": "image i: NVIDIA generate.py with seed (seed + i) mod 2**32 (a torch.Generator on the "
                         "sampling device): latents, then label randint(num_classes), then churn noise every step"}
    # The default scheme is recorded by its description alone (no "seeding" key), so that every store of this
    # scheme has the same provenance and resumes.
    return {"seeds": "image i: torch.Generator seeded with splitmix64(splitmix64(seed) ^ i); label i % num_classes"}


def _same_generation(path: Path, prov: dict) -> dict:
    """A store resumed from another working directory names the network by another path: if the file's
    content (sha256) is the same, keep the recorded path so the provenance still matches."""
    mpath = path / MANIFEST
    if mpath.is_file():
        with open(mpath) as f:
            old = json.load(f).get("provenance", {}).get("generator", {})
        if old.get("sha256") == prov["generator"]["sha256"] and "file" in old:
            prov = {**prov, "generator": {**prov["generator"], "file": old["file"]}}
    return prov


# ---------------------------------------------------------------------------------------------------- the job


def _sampler_kwargs(cfg: dict) -> dict[str, Any]:
    s = cfg["sampler"]
    return {"sigma_min": float(s["sigma_min"]), "sigma_max": float(s["sigma_max"]), "rho": float(s["rho"]),
            "S_churn": float(s["S_churn"]), "S_min": float(s["S_min"]),
            "S_max": float("inf") if s["S_max"] is None else float(s["S_max"]), "S_noise": float(s["S_noise"])}


def _scores_path(target: Path, block: int) -> Path:
    return target / SCORES_DIR / f"shard-{block:05d}.f32"


def _confidence(classifier, images: np.ndarray, labels: np.ndarray, batch_size: int, device) -> np.ndarray:
    """Softmax probability of each image's generating class: float32 (n,)."""
    import torch

    out = np.empty(len(labels), dtype=np.float32)
    with torch.no_grad():
        for a in range(0, len(labels), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(images[a:a + batch_size])).to(device)
            x = x.permute(0, 3, 1, 2).float() / 255
            y = torch.from_numpy(np.asarray(labels[a:a + batch_size])).to(device)
            p = classifier(x).float().softmax(dim=1)
            out[a:a + len(y)] = p.gather(1, y[:, None])[:, 0].cpu().numpy()
    return out


# precision= -> the torch dtype the U-Net runs in under autocast (None: plain float32). The solver state stays float64.
AUTOCAST = {"fp32": None, "bf16": "bfloat16", "fp16": "float16"}
# robustdiff-train's (Lightning's) spellings mean the same here; a store records the short form.
PRECISION_ALIASES = {"32-true": "fp32", "32": "fp32", "bf16-mixed": "bf16", "16-mixed": "fp16"}


class ShardWriter:
    """Writes finished shards on one background thread while the next shard is sampled.

    At most one write is pending (memory: the shard being written plus the one being sampled). A write's
    error is raised by the next ``submit`` or by ``close``; ``close`` (in a ``finally``) waits for the pending
    write, so an interrupted job still leaves every sampled shard complete on disk."""

    def __init__(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer")
        self._pending = None

    def submit(self, fn, *args) -> None:
        self.wait()
        self._pending = self._pool.submit(fn, *args)

    def wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._pool.shutdown(wait=True)


def _write_shard(target: Path, block: int, images: np.ndarray | None, labels: np.ndarray | None,
                 scores: np.ndarray | None) -> None:
    """The block's images and labels (unless already on disk), then its classifier scores: a scores file never
    exists without its block."""
    if images is not None:
        write_block(target, block, images, labels)
    if scores is not None:
        with atomic_path(_scores_path(target, block)) as tmp:
            scores.tofile(tmp)


class GenerationWandb:
    """The W&B run of one generation (rank 0; inactive when ``wandb.project`` is null or ``wandb.mode=disabled``).

    One W&B run per store: ``wandb.json`` in the store being written records its id, and without one the id
    comes from the store's path (``training.logging.run_id``), so a resumed generation continues the same run.
    Every W&B call is guarded: a failure prints a warning and ends the logging, never the generation."""

    def __init__(self, cfg: dict):
        self.cfg = cfg
        self.settings = wandb_settings(cfg)
        self.run = None
        self.target: Path | None = None
        self.count = 0

    def _failed(self, what: str, e: BaseException) -> None:
        print(f"robustdiff-generate: warning: W&B {what} failed ({type(e).__name__}: {e}); generating goes on "
              f"without W&B, the store is not affected", file=sys.stderr)
        run, self.run = self.run, None
        if run is not None:
            try:
                run.finish(exit_code=1)
            except Exception:  # noqa: BLE001 (already warned)
                pass

    def start(self, target: Path, provenance: dict, world_size: int) -> None:
        """Open (or resume) the W&B run of the store at ``target`` and record it there."""
        if self.settings is None:
            return
        try:
            import wandb

            from ..training.logging import read_record, resolve_mode, run_id, wandb_dir, write_record

            w, record = self.settings, read_record(target) or {}
            config = {k: v for k, v in self.cfg.items() if k != "wandb"}
            config.update(provenance=provenance, world_size=world_size, store=str(target.resolve()))
            self.run = wandb.init(
                id=run_id(target), resume="allow", job_type="generate", name=Path(self.cfg["out"]).name,
                project=record.get("project") or w["project"], entity=record.get("entity") or w.get("entity"),
                group=w.get("group") or record.get("group"), tags=list(w.get("tags") or []),
                dir=wandb_dir(target), mode=resolve_mode(w.get("mode")), config=config)
            write_record(target, self.run)
            self.target, self.count = target, int(provenance["n"])
        except Exception as e:  # noqa: BLE001 (any W&B error: warn, generate anyway)
            self._failed("start", e)

    def shard(self, block: int, images: int, seconds: float) -> None:
        """After rank 0 finished shard ``block`` (``images`` sampled in ``seconds``): its images/s and the store's
        progress (shards on disk from every process, and this one's, which may still be being written)."""
        if self.run is None:
            return
        try:
            ranges = block_ranges(self.count, self.cfg["shard_size"])
            done = set(finished_blocks(self.target)) | {block}
            on_disk = sum(ranges[b][1] - ranges[b][0] for b in done)
            row = {"generate/shards_done": len(done), "generate/images_done": on_disk,
                   "generate/progress": on_disk / self.count}
            if images and seconds > 0:
                row["generate/images_per_s"] = images / seconds
            self.run.log(row)
        except Exception as e:  # noqa: BLE001
            self._failed("logging", e)

    def done(self, manifest: dict, store: Path, images: int, seconds: float) -> None:
        """The finished store: its per-class counts and provenance, the run's images/s (rank 0), and a grid of
        the first ``wandb.grid`` images of each class, one labelled row per class."""
        if self.run is None:
            return
        try:
            import wandb

            from ..data.classes import class_names

            counts = [int(c) for c in manifest["class_counts"]]
            summary: dict[str, Any] = {"generate/count": int(manifest["count"]), "generate/class_counts": counts}
            names = class_names(self.cfg.get("dataset"), len(counts))
            if images and seconds > 0:
                summary["generate/images_per_s_run"] = images / seconds
            self.run.config.update({"provenance": manifest.get("provenance", {})}, allow_val_change=True)
            per_class = int(self.settings.get("grid") or 0)
            if per_class > 0:
                grid = first_images_grid(GeneratedStore(store), per_class, names)
                self.run.log({"samples": wandb.Image(grid, caption=(
                    f"{store.name}: the first {per_class} images of each class (one row per class)"))})
            self.run.summary.update(summary)
        except Exception as e:  # noqa: BLE001
            self._failed("logging", e)

    def close(self, exit_code: int = 0) -> None:
        if self.run is None:
            return
        try:
            self.run.finish(exit_code=exit_code)
        except Exception as e:  # noqa: BLE001
            print(f"robustdiff-generate: warning: W&B finish failed ({type(e).__name__}: {e})", file=sys.stderr)
        self.run = None


def wandb_settings(cfg: dict) -> dict | None:
    """The ``wandb:`` block when W&B logging is on (a project is set and mode is not disabled), else None.
    Checked before any work: the mode's name, and that wandb is installed."""
    w = cfg.get("wandb") or {}
    if not w.get("project"):
        return None
    from ..training.logging import MODES

    mode = w.get("mode") or "auto"
    if mode not in MODES:
        raise GenerationError(f"wandb.mode={mode!r}: choose {', '.join(MODES)} (auto: WANDB_MODE if set, else online "
                              f"with an API key or `wandb login`, else offline)")
    if mode == "disabled":
        return None
    grid = w.get("grid", 8)
    if not isinstance(grid, int) or grid < 0:
        raise GenerationError(f"wandb.grid={grid!r} must be a non-negative integer (images per class; 0 = no grid)")
    if missing := missing_extra("wandb", f"wandb.project={w['project']}"):
        raise GenerationError(missing)
    return w


def first_images_grid(store: GeneratedStore, per_class: int, names: list[str]) -> np.ndarray:
    """The first ``per_class`` images of each class of ``store`` in store order, one row per class labelled with
    ``names[k]`` (a class with fewer images is padded with white). Returns uint8 (H, W, 3)."""
    from ..utils.images import labelled_grid

    labels = store.labels()
    blank = np.full((1, *store.image_shape), 255, dtype=np.uint8)
    rows = []
    for k in range(len(names)):
        idx = np.flatnonzero(labels == k)[:per_class]
        images = store.get(idx)[0] if len(idx) else blank[:0]
        rows.append(np.concatenate([images, np.repeat(blank, per_class - len(idx), axis=0)]))
    upscale = 4 if len(names) <= 20 else 2  # as robustdiff-edm's sample grids
    return labelled_grid(np.concatenate(rows), nrow=per_class, row_labels=names, upscale=upscale)


def run_generation(fabric, cfg: dict) -> dict | None:
    """Body of one process (rank). Returns the final manifest on rank 0, None when stopped early."""
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
    from ..diffusion.sampler import sample_images

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
    sampler_kwargs = _sampler_kwargs(cfg)
    if cfg.get("compile"):
        # Only the U-Net: the preconditioning and the float64 solver stay eager. Sampling only, nothing is saved.
        mode = None if cfg["compile"] is True else cfg["compile"]
        net.model = torch.compile(net.model, mode=mode, dynamic=False)

    # Rank 0 creates (or checks) the store; every rank then takes its share of the missing shards.
    pending: list[int] | Exception = []
    if fabric.global_rank == 0:
        try:
            sha = file_sha256(cfg["network"])
            prov = _same_generation(target, provenance(cfg, net, net_format, sha, job["count"]))
            manifest = open_block_store(target, job["count"], shape, K, cfg["shard_size"], prov)
            if not manifest["complete"] or job["filter"]:  # complete candidates may still lack scores (a store
                done = set(finished_blocks(target))          # generated without selection, then selected from)
                if job["filter"]:
                    done = {b for b in done if _scores_path(target, b).is_file()}
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
    try:
        with bar:
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
                                             **sampler_kwargs)
                        parts.append(x)
                        label_parts.append(y)
                        bar.update(len(y))
                    images, labels = np.concatenate(parts), np.concatenate(label_parts)
                scores = None
                if classifier is not None:
                    scores = _confidence(classifier, images, labels, cfg["classifier_batch_size"], device)
                fresh = b not in on_disk  # a shard already on disk only gets its scores written
                writer.submit(_write_shard, target, b, images if fresh else None, labels, scores)
                log.shard(b, (z - a) if fresh else 0, time.perf_counter() - shard_start)
                written += 1
                if cfg["stop_after_shards"] is not None and written >= cfg["stop_after_shards"]:
                    break
    finally:
        writer.close()
    elapsed = time.perf_counter() - start_time
    stopped = fabric.all_reduce(torch.tensor(float(written < len(mine)), device=device), reduce_op="max")
    fabric.barrier()
    if float(stopped) > 0:
        if fabric.global_rank == 0:
            print(f"robustdiff-generate: stopped after {written} shard(s) on rank 0; rerun the same command to finish "
                  f"{target}")
        return None
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


def select_confident(candidates: Path, out: Path, cfg: dict, n: int, num_classes: int) -> dict:
    """Keep per class the n/K candidates the classifier is most confident about; write them to ``out``
    in candidate order (resumable: StoreWriter continues a partial store). Returns its manifest."""
    store = GeneratedStore(candidates)
    labels = store.labels()
    scores = np.concatenate([np.fromfile(_scores_path(candidates, b), dtype=np.float32)
                             for b in range(len(store.manifest["shards"]))])
    keep = []
    for c in range(num_classes):
        idx = np.flatnonzero(labels == c)
        order = np.lexsort((idx, -scores[idx]))  # most confident first, then lower index
        keep.append(idx[order[: n // num_classes]])
    selected = np.sort(np.concatenate(keep))
    cprov = store.provenance
    prov = {**cprov, "n": n, "filter": {
        "candidates": str(candidates.resolve()), "candidates_n": len(store), "keep_fraction": cfg["keep_fraction"],
        "classifier": str(Path(cfg["classifier"]).resolve()),
        "classifier_sha256": file_sha256(Path(cfg["classifier"]) / "model.pt" if Path(cfg["classifier"]).is_dir()
                                         else cfg["classifier"]),
        "score": "softmax probability of the generating class; top n/K per class, ties to the lower index",
        "selected_min_score": float(scores[selected].min()),
    }}
    mpath = out / MANIFEST
    if mpath.is_file():
        old = json.loads(mpath.read_text())
        if old.get("complete") and old.get("provenance") == json.loads(json.dumps(prov)):
            return old
    writer = StoreWriter(out, store.image_shape, num_classes, shard_size=cfg["shard_size"], provenance=prov)
    try:
        start = writer.count
        for a in range(start, len(selected), cfg["shard_size"]):
            images, y = store.get(selected[a:a + cfg["shard_size"]])
            writer.append(images, y)
        return writer.finalize()
    except BaseException:
        writer.close()
        raise


def generate(cfg: DictConfig | dict) -> dict | None:
    """Run the generation job described by a composed ``conf/generate.yaml`` (any number of processes).
    Returns rank 0's final manifest (None when stopped early)."""
    from lightning_fabric import Fabric

    cfg = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    dataset = cfg.get("dataset")  # the dataset group ({name: ...}) or a plain name
    cfg["dataset"] = dataset.get("name") if isinstance(dataset, dict) else dataset
    for key in ("network", "n", "out"):
        if cfg.get(key) in (None, "???"):
            raise GenerationError(f"{key}=... is required (e.g. network=runs/edm/<run>/network.pt n=10000 "
                                  f"out=data/generated/fmnist-10k)")
    wandb_settings(cfg)  # a bad wandb.mode or a missing wandb package: refused before any work
    t = cfg["trainer"]
    from ..training.run import is_launching_process
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


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="generate")
def _hydra_main(cfg: DictConfig) -> None:
    task_started()
    try:
        generate(cfg)
    except (GenerationError, StoreError, DatasetError) as e:
        print(f"robustdiff-generate: error: {e}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    run_hydra_command("robustdiff-generate", _hydra_main, "choose a writable out=<dir>")


if __name__ == "__main__":
    main()
