"""The generator-quality study (``fmnist_quality``): does a better generator give better adversarial training?

After the classifier, the reference statistics and the EDM (``stages``), every named EDM snapshot is a generator:

  generate     a store per generator                                               <out>/stores/<gen>
  quality      classifier FD and label agreement of every store (also recorded in its manifest)
  arms         TRADES with the same model, epochs, batch and seeds: real data only, each generator at a fixed
               ratio, the best generator (lowest FD, chosen before any training) at a second seed
                                                                                   <out>/runs/<arm>
  sweep        the best generator at other ratios, as one Hydra multirun           <out>/sweep/...
  evaluation   of every arm and sweep run                                          <run>/eval.json
  report       <out>/report.md
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig

from .spec import StudyError, arms
from .stages import (
    evaluate_arm,
    generate_overrides,
    generate_run,
    record_quality,
    reference_statistics,
    snapshot_path,
    stage,
    train_arm,
    train_classifier,
    train_generator,
)


def generate_stores(spec: DictConfig, out: Path, edm_dir: Path) -> dict[str, Path]:
    stores = {}
    for name, kimg in spec.generators.items():
        store = out / "stores" / name
        network, _ = snapshot_path(edm_dir, float(kimg))
        generate_run(f"4/9 generate {name}", generate_overrides(spec, network, spec.generate.n, store))
        stores[name] = store
    return stores


def measure_stores(spec: DictConfig, out: Path, stores: dict[str, Path], classifier: Path) -> dict[str, dict]:
    return {name: record_quality(out, name, store, classifier, spec.generate.n, title=f"5/9 quality of {name}",
                                 fields={"generator": name,
                                         "kimg": snapshot_path(out / "edm", float(spec.generators[name]))[1]})
            for name, store in stores.items()}


def run_sweep(spec: DictConfig, out: Path, store: Path, data_dir: str) -> list[Path]:
    """The best generator at other ratios: one real Hydra multirun (`robustdiff-train -m ...`)."""
    ratios = [float(r) for r in spec.train.get("sweep_ratios") or []]
    if not ratios:
        return []
    root = out / "sweep"
    # The multirun is the robustdiff-train command itself, run as a child process (Hydra's launcher owns it).
    argv = [sys.executable, "-m", "robustdiff.cli.train", "-m", *spec.train.overrides, f"generated={store}",
            "ratio=" + ",".join(f"{r:g}" for r in ratios), f"data_dir={data_dir}", f"run_root={root}",
            "progress=false"]
    stage(f"7/9 ratio sweep of the best generator ({', '.join(f'{r:g}' for r in ratios)})",
          "robustdiff-train " + " ".join(argv[3:]))
    subprocess.run(argv, check=True)
    runs = sorted(p.parent for p in root.glob("*/run.json"))
    done = [r for r in runs if json.loads((r / "run.json").read_text()).get("ratio") in ratios]
    if len(done) != len(ratios):
        raise StudyError(f"{root}: the sweep left {len(done)} of {len(ratios)} runs; rerun the study to resume it")
    return done


def run_quality_study(spec: DictConfig, out: Path, data_dir: str, timed: Callable[[str, float], None]) -> None:
    """Every stage up to the report, each resumed where it stopped; ``timed(stage, t0)`` records its seconds."""
    t0 = time.monotonic()
    classifier = train_classifier(spec, out, data_dir)
    reference_statistics(spec, out, classifier, data_dir)
    timed("classifier", t0)
    t0 = time.monotonic()
    edm_dir = train_generator(spec, out, data_dir)
    timed("edm", t0)
    t0 = time.monotonic()
    stores = generate_stores(spec, out, edm_dir)
    timed("generate", t0)
    t0 = time.monotonic()
    quality = measure_stores(spec, out, stores, classifier)
    timed("quality", t0)
    # Pre-registered: the best generator is the one with the lowest classifier FD, chosen before any training.
    best = min(quality, key=lambda g: quality[g]["value"])
    print(f"robustdiff-study: best generator (lowest classifier FD): {best}")
    plan = arms(spec, best)
    for i, (name, arm) in enumerate(plan):
        t0 = time.monotonic()
        store = stores[arm["generator"]] if arm["generator"] else None
        run_dir = train_arm(spec, out, name, data_dir, seed=arm["seed"], store=store, ratio=arm["ratio"],
                            title=f"6/9 TRADES arm {i + 1}/{len(plan)}: {name}")
        timed("train", t0)
        t0 = time.monotonic()
        evaluate_arm(spec, run_dir)
        timed("evaluate", t0)
    t0 = time.monotonic()
    sweep_runs = run_sweep(spec, out, stores[best], data_dir)
    timed("train", t0)
    for run_dir in sweep_runs:
        t0 = time.monotonic()
        evaluate_arm(spec, run_dir)
        timed("evaluate", t0)
