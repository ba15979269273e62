"""W&B logging of a generation run (``logger=wandb``, as robustdiff-train; off by default, extra ``robustdiff[wandb]``).

Rank 0 logs one run of job_type ``generate`` named after ``out``: its config the settings and the store's
provenance, images/s and progress per finished shard, then the per-class counts and a grid of the first images
of each class of the finished store. ``wandb.json`` in the store being written records the run id, so a resumed
generation logs into the same W&B run. A W&B failure is a warning, never lost images.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np

from ..data.store import GeneratedStore, block_ranges, finished_blocks
from ..utils.extras import missing_extra
from .generation_inputs import GenerationError


class GenerationWandb:
    """The W&B run of one generation (rank 0; inactive without ``logger=wandb`` or with ``logger.mode=disabled``).

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
            config = {k: v for k, v in self.cfg.items() if k not in ("wandb", "logger")}
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
        the first ``logger.examples`` images of each class, one labelled row per class."""
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
    """The W&B settings (project, entity, group, tags, mode, grid) when W&B logging is on, else None: from the
    ``logger`` group as in robustdiff-train (``logger=wandb logger.project=P``; ``logger.examples`` images per class
    in the finished store's grid), or from the older ``wandb.project=P`` block, which still works with a note.
    Checked before any work: the logger's name, the mode's name, and that wandb is installed."""
    from ..training.logging import MODES

    logger = cfg.get("logger") or {}
    name = logger.get("name", "none")
    if name not in ("none", "wandb"):
        raise GenerationError(f"logger={name}: robustdiff-generate logs to W&B only; choose logger=wandb or "
                              f"logger=none (the store's manifest records the generation itself)")
    old = cfg.get("wandb") or {}
    if old.get("project"):
        if name == "wandb":
            raise GenerationError("W&B is set twice: logger=wandb and wandb.project=...; keep logger=wandb "
                                  "logger.project=<name> (wandb.* is the older spelling)")
        print(f"robustdiff-generate: note: wandb.project= is the older spelling; write logger=wandb "
              f"logger.project={old['project']} (as robustdiff-train)", file=sys.stderr)
        w, key = dict(old), "wandb"
    elif name == "wandb":
        w = {k: logger.get(k) for k in ("project", "entity", "group", "tags", "mode")}
        w["grid"], key = logger.get("examples", 8), "logger"
    else:
        return None
    mode = w.get("mode") or "auto"
    if mode not in MODES:
        raise GenerationError(f"{key}.mode={mode!r}: choose {', '.join(MODES)} (auto: WANDB_MODE if set, else online "
                              f"with an API key or `wandb login`, else offline)")
    if mode == "disabled":
        return None
    grid = w.get("grid", 8)
    if not isinstance(grid, int) or grid < 0:
        what = "logger.examples" if key == "logger" else "wandb.grid"
        raise GenerationError(f"{what}={grid!r} must be a non-negative integer (images per class; 0 = no grid)")
    if not w.get("project"):
        raise GenerationError(f"{key}.project is empty: name the W&B project (logger.project=<name>)")
    spelled = f"logger=wandb logger.project={w['project']}" if key == "logger" else f"wandb.project={w['project']}"
    if missing := missing_extra("wandb", spelled):
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
