"""robustdiff-study: does a better generator give better adversarial training? The paper's question, end to end.

    robustdiff-study experiments/study/fmnist_quality.yaml --out runs/study        # make study
    robustdiff-study experiments/study/fmnist_quality_quick.yaml --out /tmp/q      # toy size (a test)
    robustdiff-study experiments/study/fmnist_quality.yaml --out runs/study --report-only

A study file (YAML, see ``experiments/study/``) names every stage; this command runs them in order:

  1. classifier   a WideResNet trained normally (loss=ce) on real data: the feature network of classifier FD
                  and the judge of label agreement                                   <out>/classifier
  2. reference    classifier-feature statistics of held-out real images, and the FD of another real sample
                  of the generated sets' size against them (the floor a perfect generator would reach)
                                                                                     <out>/quality/
  3. generator    an EDM trained on the study's real images only; its kept snapshots are generators of
                  different quality                                                  <out>/edm
  4. generate     a store per generator                                               <out>/stores/<gen>
  5. quality      classifier FD and label agreement of every store (also recorded in its manifest)
  6. arms         TRADES with the same model, epochs, batch and seeds: real data only, each generator at a
                  fixed ratio, the best generator (lowest FD, chosen before any training) at a second
                  seed                                                                <out>/runs/<arm>
  7. sweep        the best generator at other ratios, as one Hydra multirun           <out>/sweep/...
  8. evaluation   test PGD of the selected (best) epoch where the per-epoch test pass skipped it, and
                  AutoAttack on the selected checkpoint                               <run>/eval.json
  9. report       <out>/report.md: the overfitting table with generator quality, FD vs robust accuracy,
                  test PGD vs epoch of every arm

Every stage reuses its directory: rerunning the command resumes an interrupted study where it stopped and
only rewrites the report when all is done. The study file is copied to <out>/study.yaml on the first run;
a later run with a different file is refused (the protocol is fixed once results exist).
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from .common import argument_parser
from .demo import _compose, _evaluated, _require_finished

log = logging.getLogger("robustdiff.study")


class StudyError(ValueError):
    pass


def build_parser() -> argparse.ArgumentParser:
    p = argument_parser("robustdiff-study", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("study", type=Path,
                   help=f"a study file, or the name of one shipped with robustdiff ({', '.join(shipped_studies())})")
    p.add_argument("--out", type=Path, required=True, help="study directory (created; rerun to resume)")
    p.add_argument("--data-dir", default="data", help="dataset directory (default: data, then Debian's location)")
    p.add_argument("--report-only", action="store_true", help="only (re)write the report from what exists")
    p.add_argument("--arms", default=None, metavar="A,B",
                   help="a study file listing arms: train and evaluate only these (disjoint lists can run side by "
                        "side); the report waits for every arm")
    return p


# ---------------------------------------------------------------------------------------------------- the plan


STUDIES = Path(__file__).resolve().parent.parent / "studies"  # shipped in the package (a wheel has them)


def shipped_studies() -> list[str]:
    return sorted(p.stem for p in STUDIES.glob("*.yaml"))


def resolve_study(path: Path) -> Path:
    """`path` itself when it is a file; a bare name (``fmnist_v2``) is the study shipped under that name."""
    if path.is_file():
        return path
    if len(path.parts) == 1 and (STUDIES / f"{path.stem}.yaml").is_file():
        return STUDIES / f"{path.stem}.yaml"
    raise StudyError(f"study file {path}: no such file — give a study file's path or the name of a shipped study "
                     f"({', '.join(shipped_studies())})")


def load_study(path: Path, out: Path) -> DictConfig:
    path = resolve_study(path)
    spec = OmegaConf.load(path)
    listed = "arms" in spec or "stores" in spec
    for key in ("name", "dataset", "classifier", "reference", "floor", "edm", "generators", "generate", "train",
                "autoattack", *(("stores", "arms") if listed else ())):
        if key not in spec:
            raise StudyError(f"study file {path}: missing field '{key}' (see the shipped study fmnist_quality)")
    if not spec.generators:
        raise StudyError(f"study file {path}: generators: name at least one EDM snapshot (name: kimg)")
    if listed:
        from .study_arms import check_listed

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
    """(arm name, {"generator": name or None, "ratio": r, "seed": s}) in the order they run."""
    seeds = list(spec.train.seeds)
    out = [(f"real-s{seeds[0]}", {"generator": None, "ratio": 1.0, "seed": seeds[0]})]
    for g in spec.generators:
        out.append((f"{g}-r{spec.train.ratio:g}-s{seeds[0]}", {"generator": g, "ratio": spec.train.ratio,
                                                               "seed": seeds[0]}))
    for s in seeds[1:]:
        out.append((f"real-s{s}", {"generator": None, "ratio": 1.0, "seed": s}))
        out.append((f"{best}-r{spec.train.ratio:g}-s{s}", {"generator": best, "ratio": spec.train.ratio, "seed": s}))
    return out


def _stage(title: str, command: str | None = None) -> float:
    print(f"\n=== robustdiff-study: {title}" + (f"\n    same as: {command}" if command else ""), flush=True)
    return time.monotonic()


# ---------------------------------------------------------------------------------------------------- stages


def train_classifier(spec: DictConfig, out: Path, data_dir: str) -> Path:
    run_dir = out / "classifier"
    overrides = [f"dataset={spec.dataset}", *spec.classifier.overrides, f"data_dir={data_dir}",
                 f"run_root={out}", "name=classifier", "trainer.enable_progress_bar=false"]
    _stage("1/9 classifier for FD and label agreement", "robustdiff-train " + " ".join(overrides))
    _require_finished(_train(_compose("train", overrides), run_dir), run_dir)
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
    _stage("2/9 reference statistics", f"robustdiff-fid ref --dataset {info.name} --split {spec.reference.split} "
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


def train_generator(spec: DictConfig, out: Path, data_dir: str, limit_train: int | None) -> Path:
    from ..training.diffusion import train_edm

    run_dir = out / "edm"
    overrides = [f"dataset={spec.dataset}", *spec.edm.overrides, f"data_dir={data_dir}", f"run_root={out}",
                 "name=edm", "trainer.enable_progress_bar=false", "logger=csv"]
    if limit_train:
        overrides.append(f"limit_train={limit_train}")
    kimgs = sorted(float(k) for k in spec.generators.values())
    overrides.append(f"edm.snapshot_kimg={_gcd_kimg(kimgs)}")
    _stage("3/9 EDM generator on the study's real images", "robustdiff-edm " + " ".join(overrides))
    _require_finished(train_edm(_compose("train_edm", overrides), run_dir), run_dir)
    return run_dir


def _gcd_kimg(kimgs: Sequence[float]) -> float:
    """The largest snapshot interval (in whole images) that lands on every requested snapshot."""
    import math

    g = 0
    for k in kimgs:
        g = math.gcd(g, round(k * 1000))
    return g / 1000


def snapshot_path(edm_dir: Path, kimg: float) -> tuple[Path, float]:
    """The first kept EDM snapshot at or after ``kimg`` (snapshots fall on whole batches, e.g. 10.048 kimg for
    10 kimg at batch 64) and its exact kimg."""
    import re

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


def generate_stores(spec: DictConfig, out: Path, edm_dir: Path) -> dict[str, Path]:
    from ..diffusion.generate import generate

    stores = {}
    for name, kimg in spec.generators.items():
        store = out / "stores" / name
        network, _ = snapshot_path(edm_dir, float(kimg))
        overrides = [f"network={network}", f"n={spec.generate.n}", f"out={store}",
                     f"steps={spec.generate.steps}", f"seed={spec.generate.seed}", f"dataset={spec.dataset}",
                     f"precision={spec.generate.get('precision', 'fp32')}", "progress=false"]
        _stage(f"4/9 generate {name}", "robustdiff-generate " + " ".join(overrides))
        generate(_compose("generate", overrides))
        stores[name] = store
    return stores


def measure_stores(spec: DictConfig, out: Path, stores: dict[str, Path], classifier: Path) -> dict[str, dict]:
    from ..evaluation.generative import score_store
    from ..utils.io import atomic_write_json

    results = {}
    for name, store in stores.items():
        path = out / "quality" / f"{name}.json"
        if path.is_file():
            results[name] = json.loads(path.read_text())
            continue
        _stage(f"5/9 quality of {name}", f"robustdiff-fid score {store} --ref {out / 'quality' / 'reference.npz'} "
               f"--features classifier --classifier {classifier} --n-examples {spec.generate.n}")
        r = score_store(store, out / "quality" / "reference.npz", features="classifier", classifier=classifier,
                        n=spec.generate.n)
        r["generator"] = name
        r["kimg"] = snapshot_path(out / "edm", float(spec.generators[name]))[1]
        atomic_write_json(path, r)
        results[name] = r
        print(f"robustdiff-study: {name}: classifier FD {r['value']:.3f}, label agreement "
              f"{100 * r['label_agreement']:.2f}%")
    return results


def _train(cfg: DictConfig, run_dir: Path) -> dict:
    from ..training.run import train

    return train(cfg, run_dir)


def train_arm(spec: DictConfig, out: Path, name: str, arm: dict[str, Any], stores: dict[str, Path],
              data_dir: str, index: str) -> Path:
    run_dir = out / "runs" / name
    overrides = [*spec.train.overrides, f"seed={arm['seed']}", f"data_dir={data_dir}", f"run_root={out / 'runs'}",
                 f"name={name}", "trainer.enable_progress_bar=false"]
    if arm["generator"]:
        overrides += [f"generated={stores[arm['generator']]}", f"ratio={arm['ratio']}"]
    _stage(f"6/9 TRADES arm {index}: {name}", "robustdiff-train " + " ".join(overrides))
    _require_finished(_train(_compose("train", overrides), run_dir), run_dir)
    return run_dir


def run_sweep(spec: DictConfig, out: Path, store: Path, data_dir: str) -> list[Path]:
    """The best generator at other ratios: one real Hydra multirun (`robustdiff-train -m ...`)."""
    ratios = [float(r) for r in spec.train.get("sweep_ratios") or []]
    if not ratios:
        return []
    root = out / "sweep"
    argv = [sys.executable, "-m", "robustdiff.cli.train", "-m", *spec.train.overrides, f"generated={store}",
            "ratio=" + ",".join(f"{r:g}" for r in ratios), f"data_dir={data_dir}", f"run_root={root}",
            "trainer.enable_progress_bar=false"]
    _stage(f"7/9 ratio sweep of the best generator ({', '.join(f'{r:g}' for r in ratios)})",
           "robustdiff-train " + " ".join(argv[3:]))
    subprocess.run(argv, check=True)
    runs = sorted(p.parent for p in root.glob("*/run.json"))
    done = [r for r in runs if json.loads((r / "run.json").read_text()).get("ratio") in ratios]
    if len(done) != len(ratios):
        raise StudyError(f"{root}: the sweep left {len(done)} of {len(ratios)} runs; rerun the study to resume it")
    return done


def evaluate_arm(spec: DictConfig, run_dir: Path) -> None:
    """Test PGD of the best epoch (if the per-epoch pass skipped it) and AutoAttack of the best checkpoint."""
    from .evaluate import build_parser as eval_parser
    from .evaluate import run_evaluation

    summary = json.loads((run_dir / "summary.json").read_text())
    run = json.loads((run_dir / "run.json").read_text())
    ev = run.get("eval") or {}
    pgd_dir = run_dir / "pgd-best"
    if summary.get("test_pgd_acc_best") is None and not (pgd_dir / "eval.json").is_file():
        argv = [str(run_dir), "--attacks", "pgd", "--n-examples", str(spec.train.get("test_n", 1000)),
                "--pgd-steps", str(ev.get("steps", 40)), "--pgd-loss", ev.get("test_loss", "cw"),
                "--batch-size", "500", "--out", str(pgd_dir)]
        _stage(f"8/9 test PGD of the best epoch, {run_dir.name}", "robustdiff-eval " + " ".join(argv))
        run_evaluation(eval_parser().parse_args(argv))
    aa = spec.autoattack
    attacks = ",".join(aa.attacks)
    if _evaluated(run_dir, int(aa.n), attacks):
        return
    argv = [str(run_dir), "--n-examples", str(aa.n), "--attacks", "clean,autoattack", "--aa-attacks", attacks,
            "--batch-size", str(aa.get("batch_size", 500))]
    if aa.get("targets"):
        argv += ["--aa-targets", str(aa.targets)]
    _stage(f"8/9 AutoAttack, {run_dir.name}", "robustdiff-eval " + " ".join(argv))
    run_evaluation(eval_parser().parse_args(argv))


# ---------------------------------------------------------------------------------------------------- main


def run_study(args: argparse.Namespace) -> Path:
    from ..evaluation.arms_report import write_arms_report
    from ..evaluation.study_report import write_study_report as write_quality_report

    out: Path = args.out
    study = resolve_study(args.study)  # before anything is created
    out.mkdir(parents=True, exist_ok=True)
    spec = load_study(study, out)
    listed = "arms" in spec
    if args.arms and not listed:
        raise StudyError(f"--arms: {args.study} does not list its arms (no arms: section)")
    write_study_report = write_arms_report if listed else write_quality_report
    if args.report_only:
        return write_study_report(out, spec)
    from ..utils.io import atomic_write_json

    timing_path = out / "timing.json"
    seconds: dict[str, float] = json.loads(timing_path.read_text()) if timing_path.is_file() else {}

    def timed(key: str, t0: float) -> None:
        """Seconds per stage over every invocation (an interrupted one included), saved after each stage."""
        now = time.monotonic()
        seconds[key] = seconds.get(key, 0.0) + now - t0
        seconds["wall"] = seconds.get("wall", 0.0) + now - t0
        atomic_write_json(timing_path, seconds)

    if listed:
        from .study_arms import run_listed_study

        only = [a for a in args.arms.split(",") if a] if args.arms else None
        _, done = run_listed_study(spec, out, args.data_dir, only, timed)
        if not done:
            print("\nrobustdiff-study: arms still to run or evaluate; the report waits for them "
                  "(--report-only writes it from what exists)")
            return out / "report.md"
        _stage("report")
        report = write_study_report(out, spec)
        print(f"\nrobustdiff-study: {report}")
        return report
    t0 = time.monotonic()
    classifier = train_classifier(spec, out, args.data_dir)
    reference_statistics(spec, out, classifier, args.data_dir)
    timed("classifier", t0)
    t0 = time.monotonic()
    limit = _compose("train", list(spec.train.overrides)).limit_train
    edm_dir = train_generator(spec, out, args.data_dir, limit)
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
        run_dir = train_arm(spec, out, name, arm, stores, args.data_dir, f"{i + 1}/{len(plan)}")
        timed("train", t0)
        t0 = time.monotonic()
        evaluate_arm(spec, run_dir)
        timed("evaluate", t0)
    t0 = time.monotonic()
    sweep_runs = run_sweep(spec, out, stores[best], args.data_dir)
    timed("train", t0)
    for run_dir in sweep_runs:
        t0 = time.monotonic()
        evaluate_arm(spec, run_dir)
        timed("evaluate", t0)
    _stage("9/9 report")
    report = write_study_report(out, spec)
    print(f"\nrobustdiff-study: {report}")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    from ..evaluation.generative import QualityError
    from ..utils.lock import DirectoryLockedError

    try:
        run_study(args)
    except (StudyError, QualityError, DirectoryLockedError) as e:
        print(f"robustdiff-study: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
