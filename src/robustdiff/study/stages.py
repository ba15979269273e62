"""The stages every study passes through, each in its own directory under the study's ``--out`` and skipped (or
resumed) when that directory already holds its result:

  classifier   a WideResNet trained normally (loss=ce) on real data: the feature network of classifier FD and
               the judge of label agreement                                              <out>/classifier
  reference    classifier-feature statistics of held-out real images, and the FD of another real sample of the
               generated sets' size against them (the floor a perfect generator would reach)   <out>/quality/
  selector     a standard classifier trained on the study's real training images only: it picks the kept
               candidates of a store with keep_fraction < 1                              <out>/selector
  generator    an EDM trained on the study's real images only; its kept snapshots are the generators
                                                                                          <out>/edm
  evaluation   test PGD of the selected epoch where the per-epoch pass skipped it, and AutoAttack of the
               selected checkpoint                                                        <run>/eval.json

Each stage prints a banner with the command that does the same by hand (``same as: robustdiff-train ...``).
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig

from ..conf.compose import compose_config
from ..evaluation.results import has_evaluation
from ..pipeline.stages import require_finished
from .spec import StudyError

if TYPE_CHECKING:
    from ..evaluation.evaluate import EvalRequest


def stage(title: str, command: str | None = None) -> float:
    """Print a stage's banner (and the command that does the same by hand); returns the time it started."""
    print(f"\n=== robustdiff-study: {title}" + (f"\n    same as: {command}" if command else ""), flush=True)
    return time.monotonic()


# ------------------------------------------------------------------------ configs, runs and evaluations


def evaluate(request: EvalRequest) -> None:
    """One robustdiff-eval evaluation; what it refuses ends the study with robustdiff-eval's one-line message."""
    from ..evaluation.evaluate import EvaluationError
    from ..evaluation.evaluate import evaluate as evaluate_run

    try:
        evaluate_run(request)
    except EvaluationError as e:
        raise SystemExit(f"{e.command}: {e}") from None


def train_run(cfg: DictConfig, run_dir: Path) -> dict:
    """Train (or resume) the robustdiff-train run ``cfg`` in ``run_dir``; its summary."""
    from ..training.run import train

    return train(cfg, run_dir)


def generate_overrides(spec: DictConfig, network: Path, n: int, store: Path) -> list[str]:
    """The robustdiff-generate overrides that draw ``n`` images of the EDM snapshot ``network`` into ``store``
    with the study's sampler (``generate.steps``, ``seed``, ``precision``)."""
    return [f"network={network}", f"n={n}", f"out={store}", f"steps={spec.generate.steps}",
            f"seed={spec.generate.seed}", f"dataset={spec.dataset}",
            f"precision={spec.generate.get('precision', 'fp32')}", "progress=false"]


def generate_run(title: str, overrides: list[str]) -> None:
    """Print the stage's banner and run robustdiff-generate with ``overrides``."""
    from ..diffusion.generate import generate

    stage(title, "robustdiff-generate " + " ".join(overrides))
    generate(compose_config("generate", overrides))


def record_quality(out: Path, name: str, store: Path, classifier: Path, n: int, *, title: str,
                   fields: dict[str, Any], candidates: Path | None = None) -> dict[str, Any]:
    """Classifier FD and label agreement of the first ``n`` images of ``store`` against the study's reference,
    with ``fields`` added, recorded in ``<out>/quality/<name>.json`` (read back, not redone, where it exists).
    With ``candidates`` (a store selected from candidates), their scores too, as ``before_selection``."""
    from ..evaluation.generative import score_store
    from ..utils.io import atomic_write_json

    path = out / "quality" / f"{name}.json"
    if path.is_file():
        return json.loads(path.read_text())
    ref = out / "quality" / "reference.npz"
    stage(title, f"robustdiff-fid score {store} --ref {ref} --features classifier --classifier {classifier} "
          f"--n-examples {n}")
    r = score_store(store, ref, features="classifier", classifier=classifier, n=n)
    r.update(fields)
    if candidates is not None:  # label agreement of the candidates: before selection
        before = score_store(candidates, ref, features="classifier", classifier=classifier, n=None, record=False)
        r["before_selection"] = {"value": before["value"], "label_agreement": before["label_agreement"],
                                 "n": before.get("n")}
    atomic_write_json(path, r)
    print(f"robustdiff-study: {name}: classifier FD {r['value']:.3f}, label agreement "
          f"{100 * r['label_agreement']:.2f}%")
    return r


def train_arm(spec: DictConfig, out: Path, name: str, data_dir: str, *, seed: int, store: Path | None,
              ratio: float | None, title: str) -> Path:
    """Train (or resume) the TRADES arm ``name`` in ``<out>/runs/<name>``: the study's ``train.overrides`` at
    ``seed``, on real data only or (with ``store``) mixed with that store at ``ratio``."""
    run_dir = out / "runs" / name
    overrides = [*spec.train.overrides, f"seed={seed}", f"data_dir={data_dir}", f"run_root={out / 'runs'}",
                 f"name={name}", "progress=false"]
    if store is not None:
        overrides += [f"generated={store}", f"ratio={ratio}"]
    stage(title, "robustdiff-train " + " ".join(overrides))
    require_finished(train_run(compose_config("train", overrides), run_dir), run_dir)
    return run_dir


# ------------------------------------------------------------------------ the stages


def train_classifier(spec: DictConfig, out: Path, data_dir: str) -> Path:
    run_dir = out / "classifier"
    overrides = [f"dataset={spec.dataset}", *spec.classifier.overrides, f"data_dir={data_dir}",
                 f"run_root={out}", "name=classifier", "progress=false"]
    stage("1/9 classifier for FD and label agreement", "robustdiff-train " + " ".join(overrides))
    require_finished(train_run(compose_config("train", overrides), run_dir), run_dir)
    return run_dir


def reference_statistics(spec: DictConfig, out: Path, classifier: Path, data_dir: str) -> dict[str, Any]:
    from ..data.datasets import get_info
    from ..evaluation.generative import reference_and_floor
    from ..utils.io import atomic_write_json

    qdir = out / "quality"
    ref_path, floor_path = qdir / "reference.npz", qdir / "floor.json"
    info = get_info(spec.dataset)
    if ref_path.is_file() and floor_path.is_file():
        return json.loads(floor_path.read_text())
    stage("2/9 reference statistics", f"robustdiff-fid ref --dataset {info.name} --split {spec.reference.split} "
          f"--start {spec.reference.start} --count {spec.reference.count} --features classifier "
          f"--classifier {classifier} --out {ref_path}")
    try:
        result = reference_and_floor(
            classifier, info.name, data_dir, ref_path,
            (spec.reference.split, int(spec.reference.start), int(spec.reference.count)),
            (spec.floor.split, int(spec.floor.start), int(spec.floor.get("count") or spec.generate.n)))
    except ValueError as e:
        raise StudyError(str(e)) from None
    atomic_write_json(floor_path, result)
    print(f"robustdiff-study: real images {result['source']}: classifier FD {result['value']:.3f}, "
          f"label agreement {100 * result['label_agreement']:.2f}% (the floor)")
    return result


def train_selector(spec: DictConfig, out: Path, data_dir: str) -> Path:
    run_dir = out / "selector"
    overrides = [f"dataset={spec.dataset}", *spec.selector.overrides, f"data_dir={data_dir}", f"run_root={out}",
                 "name=selector", "progress=false"]
    train_cfg = compose_config("train", list(spec.train.overrides))
    cfg = compose_config("train", overrides)
    if (cfg.limit_train, cfg.val_size) != (train_cfg.limit_train, train_cfg.val_size):
        raise StudyError(f"selector.overrides: the selector must see only the arms' real training images "
                         f"(limit_train={train_cfg.limit_train} val_size={train_cfg.val_size}); it has "
                         f"limit_train={cfg.limit_train} val_size={cfg.val_size}")
    stage("selector: a standard classifier on the study's real training images only",
          "robustdiff-train " + " ".join(overrides))
    require_finished(train_run(cfg, run_dir), run_dir)
    return run_dir


def edm_command(spec: DictConfig, out: Path, data_dir: str) -> tuple[list[str], str]:
    """The overrides of the study's EDM stage and the command that trains the same network by hand."""
    limit_train = compose_config("train", list(spec.train.overrides)).limit_train
    overrides = [f"dataset={spec.dataset}", *spec.edm.overrides, f"data_dir={data_dir}", f"run_root={out}",
                 "name=edm", "progress=false", "logger=csv"]
    if limit_train:
        overrides.append(f"limit_train={limit_train}")
    kimgs = sorted(float(k) for k in spec.generators.values())
    overrides.append(f"edm.snapshot_kimg={gcd_kimg(kimgs)}")
    return overrides, "robustdiff-edm " + " ".join(overrides)


def train_generator(spec: DictConfig, out: Path, data_dir: str) -> Path:
    """The study's EDM (``<out>/edm``), trained on the study's real images only — or, where the directory was
    started from a shipped generator (``--generator``), its snapshots as they are."""
    from .generator import SHIPPED

    run_dir = out / "edm"
    if (run_dir / SHIPPED).is_file():
        source = json.loads((run_dir / SHIPPED).read_text()).get("source")
        stage(f"3/9 EDM generator: shipped ({source}), not trained")
        return run_dir
    from ..training.edm_run import train_edm

    overrides, command = edm_command(spec, out, data_dir)
    stage("3/9 EDM generator on the study's real images", command)
    require_finished(train_edm(compose_config("train_edm", overrides), run_dir), run_dir)
    return run_dir


def gcd_kimg(kimgs: Sequence[float]) -> float:
    """The largest snapshot interval (in whole images) that lands on every requested snapshot."""
    g = 0
    for k in kimgs:
        g = math.gcd(g, round(k * 1000))
    return g / 1000


def snapshot_path(edm_dir: Path, kimg: float) -> tuple[Path, float]:
    """The first kept EDM snapshot at or after ``kimg`` (snapshots fall on whole batches, e.g. 10.048 kimg for
    10 kimg at batch 64) and its exact kimg."""
    found = []
    for p in (edm_dir / "snapshots").glob("network-*.pt"):
        m = re.fullmatch(r"network-(\d+(?:\.\d+)?)\.pt", p.name)
        if m:
            found.append((float(m.group(1)), p))
    later = sorted((k, p) for k, p in found if k >= kimg - 1e-9)
    if not later:
        have = ", ".join(p.name for _, p in sorted(found)) or "none"
        raise StudyError(f"{edm_dir / 'snapshots'}: no EDM snapshot at or after {kimg:g} kimg (have: {have}); the "
                         f"EDM run must reach every generator's kimg")
    return later[0][1], later[0][0]


def evaluate_arm(spec: DictConfig, run_dir: Path) -> None:
    """Test PGD of the best epoch (if the per-epoch pass skipped it) and AutoAttack of the best checkpoint."""
    from ..evaluation.evaluate import EvalRequest

    summary = json.loads((run_dir / "summary.json").read_text())
    run = json.loads((run_dir / "run.json").read_text())
    ev = run.get("eval") or {}
    pgd_dir = run_dir / "pgd-best"
    if summary.get("test_pgd_acc_best") is None and not (pgd_dir / "eval.json").is_file():
        n, steps, loss = int(spec.train.get("test_n", 1000)), int(ev.get("steps", 40)), ev.get("test_loss", "cw")
        stage(f"8/9 test PGD of the best epoch, {run_dir.name}",
              f"robustdiff-eval {run_dir} --attacks pgd --n-examples {n} --pgd-steps {steps} --pgd-loss {loss} "
              f"--batch-size 500 --out {pgd_dir}")
        evaluate(EvalRequest(target=run_dir, attacks=["pgd"], n_examples=n, pgd_steps=steps, pgd_loss=loss,
                             batch_size=500, out=pgd_dir))
    aa = spec.autoattack
    attacks = ",".join(aa.attacks)
    if has_evaluation(run_dir, int(aa.n), attacks):
        return
    batch_size = int(aa.get("batch_size", 500))
    targets = int(aa.targets) if aa.get("targets") else None
    stage(f"8/9 AutoAttack, {run_dir.name}",
          f"robustdiff-eval {run_dir} --n-examples {aa.n} --attacks clean,autoattack --aa-attacks {attacks} "
          f"--batch-size {batch_size}" + (f" --aa-targets {targets}" if targets else ""))
    evaluate(EvalRequest(target=run_dir, n_examples=int(aa.n), attacks=["clean", "autoattack"],
                         aa_attacks=[str(a) for a in aa.attacks], batch_size=batch_size, aa_targets=targets))
