"""A study file: finding it (a path, or the name of a study shipped in ``robustdiff/studies/``), checking it
before any work, fixing it in the study directory, and the order of the arms it implies.

A study file is YAML (see ``experiments/study/`` and the shipped ``fmnist_quality``). It names the dataset, the
measuring classifier, the reference and floor images, the EDM and its snapshots (``generators``), generation,
TRADES training and AutoAttack. A study that also lists ``stores:`` and ``arms:`` (``fmnist_v2``) names each
store and each arm itself; `check_listed` checks that they refer to things that exist, with values in range.

The file is copied to ``<out>/study.yaml`` on the first run; a later run with a different file is refused, since
results computed under the first protocol may already exist.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf


class StudyError(ValueError):
    """A study file, or a study directory, that cannot be run as asked; the message says why."""


STUDIES = Path(__file__).resolve().parent.parent / "studies"  # shipped in the package (a wheel has them)

REQUIRED = ("name", "dataset", "classifier", "reference", "floor", "edm", "generators", "generate", "train",
            "autoattack")
STORE_KEYS = {"generator", "n", "keep_fraction", "candidates"}
ARM_KEYS = {"store", "ratio", "seed"}


def shipped_studies() -> list[str]:
    """The names of the studies shipped with robustdiff."""
    return sorted(p.stem for p in STUDIES.glob("*.yaml"))


def resolve_study(path: Path) -> Path:
    """`path` itself when it is a file; a bare name (``fmnist_v2``) is the study shipped under that name."""
    if path.is_file():
        return path
    if len(path.parts) == 1 and (STUDIES / f"{path.stem}.yaml").is_file():
        return STUDIES / f"{path.stem}.yaml"
    raise StudyError(f"study file {path}: no such file — give a study file's path or the name of a shipped study "
                     f"({', '.join(shipped_studies())})")


def is_listed(spec: DictConfig) -> bool:
    """Whether the study lists its own stores and arms (``stores:`` and ``arms:``)."""
    return "arms" in spec or "stores" in spec


def load_study(path: Path, out: Path) -> DictConfig:
    """The checked study; its copy in ``out/study.yaml`` is written on the first run and must match later."""
    path = resolve_study(path)
    spec = OmegaConf.load(path)
    listed = is_listed(spec)
    for key in (*REQUIRED, *(("stores", "arms") if listed else ())):
        if key not in spec:
            raise StudyError(f"study file {path}: missing field '{key}' (see the shipped study fmnist_quality)")
    if not spec.generators:
        raise StudyError(f"study file {path}: generators: name at least one EDM snapshot (name: kimg)")
    if listed:
        check_listed(spec, path)
    kept = out / "study.yaml"
    text = OmegaConf.to_yaml(spec)
    if kept.is_file():
        if OmegaConf.to_yaml(OmegaConf.load(kept)) != text:
            raise StudyError(f"{kept}: this study directory was started with another protocol than {path}; "
                             f"results may exist, so it is not changed — choose another --out, or restore {path}")
    else:
        from ..utils.io import atomic_write_text

        atomic_write_text(kept, text)
    return spec


def arms(spec: DictConfig, best: str) -> list[tuple[str, dict[str, Any]]]:
    """The arms of a study that does not list them: (arm name, {"generator": name or None, "ratio": r,
    "seed": s}) in the order they run."""
    seeds = list(spec.train.seeds)
    out = [(f"real-s{seeds[0]}", {"generator": None, "ratio": 1.0, "seed": seeds[0]})]
    for g in spec.generators:
        out.append((f"{g}-r{spec.train.ratio:g}-s{seeds[0]}", {"generator": g, "ratio": spec.train.ratio,
                                                               "seed": seeds[0]}))
    for s in seeds[1:]:
        out.append((f"real-s{s}", {"generator": None, "ratio": 1.0, "seed": s}))
        out.append((f"{best}-r{spec.train.ratio:g}-s{s}", {"generator": best, "ratio": spec.train.ratio, "seed": s}))
    return out


def check_listed(spec: DictConfig, path: Path) -> None:
    """The stores and arms refer to things that exist, with values in range — before any work."""
    gens = set(spec.generators)
    for name, s in spec.stores.items():
        where = f"study file {path}: stores.{name}"
        extra = set(s) - STORE_KEYS
        if extra or not {"generator", "n"} <= set(s):
            raise StudyError(f"{where}: give generator and n (and optionally keep_fraction); unknown: {sorted(extra)}")
        if s.generator not in gens and s.generator != "best":
            raise StudyError(f"{where}.generator={s.generator!r}: name one of generators ({', '.join(gens)}) or best")
        if not (isinstance(s.n, int) and s.n > 0):
            raise StudyError(f"{where}.n={s.n!r} must be a whole number > 0")
        kf = float(s.get("keep_fraction", 1))
        if not 0 < kf <= 1:
            raise StudyError(f"{where}.keep_fraction={kf:g} must be in (0, 1]")
        if kf < 1 and "selector" not in spec:
            raise StudyError(f"{where}.keep_fraction={kf:g} needs a selector: classifier in the study file")
        if s.get("candidates") is not None:  # select from another listed store: generated once, used twice
            names = list(spec.stores)
            c = spec.stores.get(s.candidates)
            want = math.ceil(math.ceil(s.n / kf) / _num_classes(spec)) * _num_classes(spec)
            if (kf == 1 or c is None or names.index(s.candidates) > names.index(name) or c.generator != s.generator
                    or float(c.get("keep_fraction", 1)) != 1 or c.n != want):
                raise StudyError(f"{where}.candidates={s.candidates!r}: name a raw store (keep_fraction 1) listed "
                                 f"before it, of the same generator, with n={want} (the candidates keep_fraction "
                                 f"{kf:g} of n={s.n} needs)")
    raw = {s.generator for s in spec.stores.values() if float(s.get("keep_fraction", 1)) == 1}
    if any(s.generator == "best" for s in spec.stores.values()) and not gens <= raw:
        raise StudyError(f"study file {path}: a store uses generator best, so every generator needs a raw store "
                         f"(keep_fraction 1) whose FD chooses it; missing for {sorted(gens - raw)}")
    for name, a in spec.arms.items():
        where = f"study file {path}: arms.{name}"
        if set(a) - ARM_KEYS or "seed" not in a:
            raise StudyError(f"{where}: give seed, and store + ratio for generated data; unknown: "
                             f"{sorted(set(a) - ARM_KEYS)}")
        if a.get("store") is not None:
            if a.store not in spec.stores:
                raise StudyError(f"{where}.store={a.store!r}: name one of stores ({', '.join(spec.stores)})")
            if not 0 < float(a.get("ratio", 0)) < 1:
                raise StudyError(f"{where}.ratio={a.get('ratio')!r}: the real fraction of a batch, in (0, 1)")
    from ..conf.compose import compose_config

    train_cfg = compose_config("train", list(spec.train.overrides))
    edm_cfg = compose_config("train_edm", list(spec.edm.overrides))
    if int(edm_cfg.get("val_size", 0)) != int(train_cfg.val_size):
        raise StudyError(f"study file {path}: edm.overrides must leave out the arms' {train_cfg.val_size} validation "
                         f"images (val_size={train_cfg.val_size}); they give val_size={edm_cfg.get('val_size', 0)}")


def _num_classes(spec: DictConfig) -> int:
    from ..data.datasets import get_info

    return get_info(spec.dataset).num_classes
