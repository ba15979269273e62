"""The inputs of a generation job, checked before any work: settings, networks and provenance.

- `plan`: the settings of ``conf/generate.yaml`` checked, and the job's counts and paths (how many images,
  which store, whether a classifier filters them);
- `load_generator`: the EDM network (a robustdiff ``network.pt`` or NVIDIA's ``.pkl``);
- `load_classifier` (`read_classifier`): the classifier that scores candidates — a robustdiff-train run directory of
  any architecture (``models.loading.load_model``), its robustdiff-eval export, or a WideResNet state dict;
- `provenance`: what a store records about how its images were made, and `same_generation` to resume a store
  from another working directory.

Every bad input raises a `GenerationError` whose message names the field and the fix.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..data.store import MANIFEST

# torch is imported inside the functions that use it: robustdiff-generate --help answers without it.
if TYPE_CHECKING:
    import torch

# precision= -> the torch dtype the U-Net runs in under autocast (None: plain float32). The solver state stays float64.
AUTOCAST = {"fp32": None, "bf16": "bfloat16", "fp16": "float16"}
# robustdiff-train's (Lightning's) spellings mean the same here; a store records the short form.
PRECISION_ALIASES = {"32-true": "fp32", "32": "fp32", "bf16-mixed": "bf16", "16-mixed": "fp16"}


class GenerationError(ValueError):
    """Bad input to robustdiff-generate; the message names the file or field and the fix."""


def load_generator(path: str | os.PathLike, device: torch.device | str = "cpu"):
    """EDM network from a robustdiff ``network.pt`` or an NVIDIA ``.pkl``. Returns (net, format name)."""
    from ..training.diffusion import NetworkFileError, load_network
    from .pretrained import PretrainedError, load_edm_pickle

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


def read_classifier(path: str | os.PathLike, dataset: str | None, num_classes: int | None = None,
                    channels: int | None = None, device: torch.device | str = "cpu"
                    ) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A classifier trained by robustdiff-train, of any architecture, in eval mode on ``device``, and what it is:
    ``{"weights": the weights file, "dataset": its dataset, "record": run.json's model record or None,
    "name": "wrn-28-10", "preactresnet18", ...}``.

    ``path`` is one of

    - a run directory (model.pt + run.json): rebuilt by ``robustdiff.models.loading.load_model`` from run.json's
      ``model`` record — a WideResNet, or the ``nn.Module`` the run named with ``model._target_``; the dataset
      (mean/std) is the run's;
    - a file written by ``robustdiff-eval export`` for another architecture (``{'state_dict', 'model', 'dataset'}``):
      rebuilt from the record it holds;
    - a WideResNet state dict (plain, prefixed, the reference's or RobustBench's layout, as ``load_wideresnet``
      reads them); it does not say how to normalise its inputs, so ``dataset`` is required. The state dict of
      another architecture does not say which network it belongs to: give its run directory.

    With ``num_classes``/``channels`` (the generator's) it must classify that many classes of that many channels.
    Every refusal is a one-line `GenerationError` naming the file."""
    from collections.abc import Mapping

    from ..data.datasets import get_info
    from ..models.loading import (
        CheckpointError,
        is_wideresnet_record,
        load_model,
        load_wideresnet,
        model_name,
        read_checkpoint,
    )

    path = Path(path)
    record, state = None, None
    if path.is_dir():
        run_json, weights = path / "run.json", path / "model.pt"
        if not run_json.is_file() or not weights.is_file():
            raise GenerationError(f"classifier={path}: a run directory needs run.json and model.pt "
                                  f"(written by robustdiff-train)")
        try:
            run = json.loads(run_json.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise GenerationError(f"classifier={run_json}: not a readable run.json ({type(e).__name__}: {e})") from None
        if not isinstance(run, dict) or not isinstance(run.get("dataset"), str):
            raise GenerationError(f"classifier={run_json}: records no dataset (written by robustdiff-train?)")
        dataset, record = run["dataset"], run.get("model")
        if record is not None and not isinstance(record, Mapping):
            raise GenerationError(f"classifier={run_json}: its model record is {type(record).__name__}, not a mapping")
    elif path.is_file():
        weights = path
        try:
            state = read_checkpoint(weights, "a classifier state dict")
        except CheckpointError as e:
            raise GenerationError(f"classifier={e}") from None
        inner = state.get("model") if isinstance(state, Mapping) else None
        if isinstance(inner, Mapping) and ("_target_" in inner or "name" in inner):
            # robustdiff-eval export of another architecture: {'state_dict', 'model': run.json's record, 'dataset'}
            record = dict(inner)
            saved = state.get("dataset")
            dataset = dataset or (saved if isinstance(saved, str) else None)
        elif isinstance(inner, Mapping):  # a {'model': state_dict} wrapper
            state = inner
        if dataset is None:
            hint = (f" or give the run directory {path.parent}" if (path.parent / "run.json").is_file() else "")
            raise GenerationError(f"classifier={path}: a plain state dict does not say how to normalise its inputs — "
                                  f"pass dataset=<name> (its mean/std are used){hint}")
    else:
        raise GenerationError(f"classifier={path}: no such file or run directory")
    try:
        info = get_info(dataset)
    except ValueError as e:
        raise GenerationError(f"classifier={weights}: {e}") from None
    try:
        if state is not None and is_wideresnet_record(record):
            try:  # already read: not read twice
                model = load_wideresnet(state, dataset=dataset)
            except CheckpointError as e:
                said = str(e).removeprefix("checkpoint: ")
                raise CheckpointError(f"{weights}: {said}; a network other than a WideResNet loads from its run "
                                      "directory (run.json records the model) or its robustdiff-eval export") from None
        else:
            model = load_model(weights, dataset=dataset, record=record)
    except (CheckpointError, FileNotFoundError) as e:
        raise GenerationError(f"classifier={e}") from None
    except RuntimeError as e:  # load_state_dict: a key or shape that does not fit
        raise GenerationError(f"classifier={weights}: does not load: {str(e).splitlines()[0]}") from None
    # The model fits the dataset (WideResNet: its head and first conv are checked against it; another network is
    # built for it and loaded strictly): the dataset's classes and channels are the model's.
    classes, in_channels = info.num_classes, info.image_shape[2]
    if (num_classes is not None and classes != num_classes) or (channels is not None and in_channels != channels):
        raise GenerationError(f"classifier={weights}: has {classes} classes and {in_channels} input channels "
                              f"({dataset}), but the network generates {num_classes} classes of {channels}-channel "
                              f"images")
    about = {"weights": weights, "dataset": dataset, "record": dict(record) if record else None,
             "name": model_name(model, record)}
    return model.to(device), about


def load_classifier(path: str | os.PathLike, dataset: str | None, num_classes: int, channels: int,
                    device: torch.device | str = "cpu") -> torch.nn.Module:
    """The classifier at ``path`` (`read_classifier`: a robustdiff-train run directory of any architecture, its
    robustdiff-eval export, or a WideResNet state dict with ``dataset``), in eval mode on ``device``. It must
    classify ``num_classes`` classes of ``channels``-channel images (the network's)."""
    return read_classifier(path, dataset, num_classes, channels, device)[0]


def plan(cfg: dict, num_classes: int) -> dict[str, Any]:
    """Counts and paths of the job (checks that must fail before any work)."""
    from ..conf.schema import COMPILE_MODES
    from ..utils.choices import COMPILE_CHOICES
    from .sampler import SEEDINGS

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


def sampler_kwargs(cfg: dict) -> dict[str, Any]:
    """The ``sampler:`` settings as keyword arguments of ``sample_images`` (``S_max: null`` is infinity)."""
    s = cfg["sampler"]
    return {"sigma_min": float(s["sigma_min"]), "sigma_max": float(s["sigma_max"]), "rho": float(s["rho"]),
            "S_churn": float(s["S_churn"]), "S_min": float(s["S_min"]),
            "S_max": float("inf") if s["S_max"] is None else float(s["S_max"]), "S_noise": float(s["S_noise"])}


def provenance(cfg: dict, net, net_format: str, sha256: str, count: int) -> dict[str, Any]:
    """What the store records about its images: the network, the sampler settings, the seed and the seeding."""
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


def same_generation(path: Path, prov: dict) -> dict:
    """A store resumed from another working directory names the network by another path: if the file's
    content (sha256) is the same, keep the recorded path so the provenance still matches."""
    mpath = path / MANIFEST
    if mpath.is_file():
        with open(mpath) as f:
            old = json.load(f).get("provenance", {}).get("generator", {})
        if old.get("sha256") == prov["generator"]["sha256"] and "file" in old:
            prov = {**prov, "generator": {**prov["generator"], "file": old["file"]}}
    return prov
