"""A study whose file lists its stores and arms (``stores:`` and ``arms:``, e.g. experiments/study/fmnist_v2.yaml).

Stages, each in its own directory under ``--out`` and skipped when already done (rerun the command to resume):

  classifier   the measuring classifier (classifier FD, label agreement); it never shapes training data
  reference    classifier statistics of held-out real images, and the real floor
  selector     a standard classifier trained on the study's real training images only: it picks the kept
               candidates of a store with keep_fraction < 1 (the paper's selection)
  generator    one EDM trained on the study's real training images only (its validation images left out)
  stores       every listed store, from its generator's snapshot (``best`` = the generator whose raw store has
               the lowest classifier FD, fixed before any adversarial training), then its quality
  arms         TRADES runs with identical settings but the data: real only, or a store at a ratio
  evaluation   test PGD of the selected epoch where the per-epoch pass skipped it; AutoAttack of the selected
               checkpoint
  report       <out>/report.md, results.json and figures

``--arms a,b`` trains and evaluates only those arms (two commands with disjoint lists share a 2-core machine);
the stages before the arms are shared: a command that finds one in use by the other waits for it, then finds it
done. The report is written when every arm is done (or with ``--report-only``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from .spec import StudyError
from .stages import (
    evaluate_arm,
    generate_overrides,
    generate_run,
    record_quality,
    reference_statistics,
    snapshot_path,
    train_arm,
    train_classifier,
    train_generator,
    train_selector,
)

SHARED_POLL_S = 30.0  # how often a command waiting on a shared stage tries again


def shared_stage(call, *args, wait=time.sleep, **kwargs):
    """Run a stage both commands of a split study (disjoint ``--arms`` lists, one ``--out``) pass through; while
    the other command holds it, wait and try again: the stage is then found done, not redone."""
    from ..utils.lock import DirectoryLockedError

    announced = False
    while True:
        try:
            return call(*args, **kwargs)
        except DirectoryLockedError as e:
            if not announced:
                print(f"robustdiff-study: waiting: {e.directory}: in use by {e.holder} (a stage this command shares with "
                      f"the other one on this --out); trying again every {SHARED_POLL_S:g} s", flush=True)
                announced = True
            wait(SHARED_POLL_S)


def _candidates(out: Path, name: str, store: DictConfig) -> Path:
    return out / "stores" / (store.candidates if store.get("candidates") else f"{name}-candidates")


def _store_network(spec: DictConfig, out: Path, store: DictConfig, best: str | None) -> tuple[str, Path, float]:
    gen = best if store.generator == "best" else store.generator
    if gen is None:
        raise StudyError("internal: a store of the best generator was asked for before the best was chosen")
    network, kimg = snapshot_path(out / "edm", float(spec.generators[gen]))
    return gen, network, kimg


def generate_store(spec: DictConfig, out: Path, name: str, best: str | None, selector: Path | None) -> Path:
    s = spec.stores[name]
    store = out / "stores" / name
    gen, network, _ = _store_network(spec, out, s, best)
    overrides = generate_overrides(spec, network, s.n, store)
    kf = float(s.get("keep_fraction", 1))
    if kf < 1:
        overrides += [f"classifier={selector}", f"keep_fraction={kf:g}", f"candidates={_candidates(out, name, s)}"]
    if (store / "manifest.json").is_file() and json.loads((store / "manifest.json").read_text()).get("complete"):
        return store
    generate_run(f"stores: {name} ({gen}, {s.n:,} images{f', keep {kf:g} of the candidates' if kf < 1 else ''})",
                 overrides)
    return store


def measure_store(spec: DictConfig, out: Path, name: str, best: str | None, classifier: Path) -> dict[str, Any]:
    s = spec.stores[name]
    gen, _, kimg = _store_network(spec, out, s, best)
    kf = float(s.get("keep_fraction", 1))
    return record_quality(out, name, out / "stores" / name, classifier, s.n, title=f"quality of {name}",
                          fields=dict(store=name, generator=gen, kimg=kimg, n_images=int(s.n), keep_fraction=kf),
                          candidates=_candidates(out, name, s) if kf < 1 else None)


def choose_best(spec: DictConfig, quality: dict[str, dict]) -> str:
    """The generator whose raw store (keep_fraction 1) has the lowest classifier FD."""
    raw = {q["generator"]: q["value"] for name, q in quality.items()
           if q.get("keep_fraction", 1) == 1 and spec.stores[name].generator != "best"}
    return min(raw, key=raw.get)


def run_listed_study(spec: DictConfig, out: Path, data_dir: str, only: list[str] | None,
                     timed: Callable[[str, float], None]) -> tuple[str | None, bool]:
    """Run every stage (the arms in ``only`` if given). Returns (best generator, whether every arm is done)."""
    if only:
        unknown = [a for a in only if a not in spec.arms]
        if unknown:
            raise StudyError(f"--arms: {', '.join(unknown)} not in the study's arms ({', '.join(spec.arms)})")
    t0 = time.monotonic()
    classifier = shared_stage(train_classifier, spec, out, data_dir)
    reference_statistics(spec, out, classifier, data_dir)
    needs_selector = any(float(s.get("keep_fraction", 1)) < 1 for s in spec.stores.values())
    selector = shared_stage(train_selector, spec, out, data_dir) if needs_selector else None
    timed("classifier", t0)
    if only and all(spec.arms[a].get("store") is None for a in only):  # real data only: no generator needed
        _run_arms(spec, out, data_dir, only, timed)
        return None, _all_evaluated(spec, out)
    t0 = time.monotonic()
    shared_stage(train_generator, spec, out, data_dir)
    timed("edm", t0)
    quality: dict[str, dict] = {}
    best = None
    for phase in ("named", "best"):  # raw stores of named generators first: their FD chooses the best
        if phase == "best":
            best = choose_best(spec, quality)
            print(f"robustdiff-study: best generator (lowest classifier FD of its raw store): {best}")
        for name, s in spec.stores.items():
            if (s.generator == "best") != (phase == "best"):
                continue
            t0 = time.monotonic()
            shared_stage(generate_store, spec, out, name, best, selector)
            timed("generate", t0)
            t0 = time.monotonic()
            quality[name] = measure_store(spec, out, name, best, classifier)
            timed("quality", t0)
    if best is None:
        best = choose_best(spec, quality)
    _run_arms(spec, out, data_dir, only, timed)
    return best, _all_evaluated(spec, out)


def _run_arms(spec: DictConfig, out: Path, data_dir: str, only: list[str] | None,
              timed: Callable[[str, float], None]) -> None:
    names = list(spec.arms)
    for i, name in enumerate(names):
        if only and name not in only:
            continue
        t0 = time.monotonic()
        a = spec.arms[name]
        store = out / "stores" / a.store if a.get("store") is not None else None
        run_dir = train_arm(spec, out, name, data_dir, seed=a.seed, store=store, ratio=a.get("ratio"),
                            title=f"arm {i + 1}/{len(names)}: {name}")
        timed("train", t0)
        t0 = time.monotonic()
        evaluate_arm(spec, run_dir)
        timed("evaluate", t0)


def _all_evaluated(spec: DictConfig, out: Path) -> bool:
    return all((out / "runs" / n / "eval.json").is_file() for n in spec.arms)
