"""The whole pipeline of the paper, shrunk to minutes on a CPU (Fashion-MNIST): what ``robustdiff-demo`` runs.

    1. train a small class-conditional EDM                       <out>/generator/edm       (robustdiff-edm)
    2. sample a labelled store from it                           <out>/generator/store     (robustdiff-generate)
    3. measure the store: a classifier trained normally on real  <out>/generator/classifier,
       data, its classifier FD and label agreement, and the       quality/                 (robustdiff-fid)
       same numbers for held-out real images
    4. TRADES without and with the generated images              <out>/runs/{real,generated} (robustdiff-train)
    5. AutoAttack on the first test images, for both             <out>/runs/*/eval.json    (robustdiff-eval)
    6. a report comparing the two, with the generator's quality  <out>/report.md, figures/ (robustdiff-report)

Every stage reuses its directory: running it again finishes what an interruption left and skips what is done.
Each stage is the same library function its command runs, with the same Hydra configs (conf/train_edm.yaml,
conf/generate.yaml, conf/train.yaml with experiment=fashionmnist_demo); each banner prints the command that
redoes the stage by hand.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from ..conf.compose import compose_config
from ..evaluation.results import has_evaluation
from ..utils.io import atomic_write_text
from .stages import require_finished, stage


@dataclasses.dataclass(frozen=True, kw_only=True)
class DemoSettings:
    """Sizes of every stage (robustdiff-demo's flags)."""

    out: Path = Path("runs/demo")  # the demo directory
    data_dir: str = "data"
    # generator
    edm_kimg: float = 6.4  # EDM training length in thousands of images
    edm_limit_train: int | None = None  # EDM on the first N training images only
    n_generated: int = 1000  # images in the store (multiple of 10)
    sampler_steps: int = 4  # Heun steps per image
    # generator quality
    classifier_limit_train: int = 12288  # the measuring classifier trains (loss=ce) on the first N real images
    classifier_epochs: int = 2
    fd_reference: int = 2000  # FD reference: the first N test images
    floor_start: int = 50000  # held-out real training images from here (as many as the store) give the FD floor
    # adversarial training (experiment=fashionmnist_demo, reduced)
    model: str = "wrn-10-1"
    epochs: int = 2
    batch_size: int = 128
    limit_train: int = 8192
    val_size: int = 1024
    limit_test: int = 1000
    ratio: float = 0.5  # real fraction of each batch in the generated run
    train_overrides: tuple[str, ...] = ()  # more robustdiff-train overrides for both runs
    # evaluation
    n_examples: int = 100  # AutoAttack on the first N test images
    aa_attacks: str | None = "apgd-ce"  # comma-separated; "standard" (or None) = all four


def run_demo(settings: DemoSettings) -> dict:
    """Run (or resume) every stage; returns {"report": path, "rows": [...], "seconds": {stage: s}, "quality": {...},
    "verdict": the one-line comparison of the two runs}."""
    from ..diffusion.generate import generate
    from ..evaluation.evaluate import EvalRequest, evaluate
    from ..evaluation.report import write_report
    from ..training.edm_run import train_edm
    from ..training.run import train

    d = settings
    out = d.out
    seconds: dict[str, float] = {}

    edm_dir = out / "generator" / "edm"
    edm = [f"run_root={edm_dir.parent}", f"name={edm_dir.name}", "dataset=fashionmnist", "edm=small",
           f"edm.duration_kimg={d.edm_kimg}", f"edm.snapshot_kimg={d.edm_kimg}", "logger=csv",
           "grid.rows=1", "grid.steps=8", f"data_dir={d.data_dir}", "progress=false"]
    if d.edm_limit_train:
        edm.append(f"limit_train={d.edm_limit_train}")
    t0 = stage("1/6 EDM generator", "robustdiff-edm " + " ".join(edm))
    require_finished(train_edm(compose_config("train_edm", edm), edm_dir), edm_dir)
    seconds["edm"] = time.monotonic() - t0

    store = out / "generator" / "store"
    gen = [f"network={edm_dir / 'network.pt'}", f"n={d.n_generated}", f"out={store}",
           f"steps={d.sampler_steps}", "dataset=fashionmnist", "progress=false"]
    t0 = stage("2/6 generated store", "robustdiff-generate " + " ".join(gen))
    generate(compose_config("generate", gen))  # a complete store of this same generation is left as it is
    seconds["generate"] = time.monotonic() - t0

    t0 = stage("3/6 generator quality", f"robustdiff-fid score {store} --ref {out / 'quality' / 'reference.npz'} "
               f"--classifier {out / 'generator' / 'classifier'}")
    quality = measure_generator(d, store)
    seconds["quality"] = time.monotonic() - t0

    runs_root = out / "runs"
    common = ["experiment=fashionmnist_demo", f"model={d.model}", f"epochs={d.epochs}",
              f"batch_size={d.batch_size}", f"limit_train={d.limit_train}", f"val_size={d.val_size}",
              f"limit_test={d.limit_test}", f"data_dir={d.data_dir}", f"run_root={runs_root}",
              "progress=false", *d.train_overrides]
    variants = {"real": [], "generated": [f"generated={store}", f"ratio={d.ratio}"]}
    for i, (name, extra) in enumerate(variants.items()):
        overrides = [*common, f"name={name}", *extra]
        t0 = stage(f"4/6 TRADES, {name} data ({i + 1}/2)", "robustdiff-train " + " ".join(overrides))
        require_finished(train(compose_config("train", overrides), runs_root / name), runs_root / name)
        seconds[f"train_{name}"] = time.monotonic() - t0

    aa_attacks = ([a.strip() for a in d.aa_attacks.split(",") if a.strip()]
                  if d.aa_attacks and d.aa_attacks != "standard" else None)
    for name in variants:
        run_dir = runs_root / name
        argv = [str(run_dir), "--n-examples", str(d.n_examples), "--attacks", "clean,autoattack"]
        if aa_attacks is not None:
            argv += ["--aa-attacks", d.aa_attacks]
        t0 = stage(f"5/6 AutoAttack, {name}", "robustdiff-eval " + " ".join(argv))
        if has_evaluation(run_dir, d.n_examples, d.aa_attacks):
            print(f"robustdiff-demo: {run_dir}/eval.json already has this evaluation; nothing to do.")
        else:
            evaluate(EvalRequest(target=run_dir, n_examples=d.n_examples, attacks=["clean", "autoattack"],
                                 aa_attacks=aa_attacks))
        seconds[f"autoattack_{name}"] = time.monotonic() - t0

    t0 = stage("6/6 report", f"robustdiff-report {runs_root} --out {out}")
    rows = write_report(runs_root, out, title="robustdiff demo: TRADES on Fashion-MNIST without and with generated data")
    report = out / "report.md"
    verdict = quality_section(quality, rows)
    atomic_write_text(report, report.read_text().rstrip() + "\n\n" + verdict["markdown"])
    seconds["report"] = time.monotonic() - t0
    return {"report": report, "rows": rows, "seconds": seconds, "quality": quality, "verdict": verdict["text"]}


def measure_generator(settings: DemoSettings, store: Path) -> dict:
    """A classifier trained normally on real data, then the store's classifier FD and label agreement against
    held-out test images, and the same for as many held-out real training images (the floor)."""
    from ..evaluation.generative import reference_and_floor, score_store
    from ..training.run import train
    from ..utils.io import atomic_write_json

    d = settings
    clf_dir = d.out / "generator" / "classifier"
    clf = ["experiment=fmnist_classifier", "model=wrn-10-1", f"epochs={d.classifier_epochs}",
           f"limit_train={d.classifier_limit_train}", f"val_size={min(1024, d.classifier_limit_train // 4)}",
           "batch_size=64", "ema_decay=0.99", "limit_test=2000",
           f"data_dir={d.data_dir}", f"run_root={clf_dir.parent}", f"name={clf_dir.name}",
           "progress=false", "logger=csv"]
    print("    classifier: robustdiff-train " + " ".join(clf), flush=True)
    require_finished(train(compose_config("train", clf), clf_dir), clf_dir)

    qdir = d.out / "quality"
    path = qdir / "quality.json"
    if path.is_file():
        return json.loads(path.read_text())
    ref_path = qdir / "reference.npz"
    floor = reference_and_floor(clf_dir, "fashionmnist", d.data_dir, ref_path, ("test", 0, d.fd_reference),
                                ("train", d.floor_start, d.n_generated))
    generated = score_store(store, ref_path, features="classifier", classifier=clf_dir, n=None)
    result = {"generated": generated, "floor": floor, "edm_kimg": d.edm_kimg, "sampler_steps": d.sampler_steps}
    atomic_write_json(path, result)
    return result


def quality_section(quality: dict, rows: list[dict]) -> dict:
    """The report's generator-quality section and a one-line verdict, both computed from the numbers."""
    g, f = quality["generated"], quality["floor"]
    by_run = {r["run"]: r for r in rows}
    real, gen = by_run.get("real", {}), by_run.get("generated", {})
    lines = ["## Generator quality", "",
             "| data | classifier FD (lower = closer to real) | label agreement (%) | images |", "|---|---|---|---|",
             f"| generated store (EDM {quality['edm_kimg']:g} kimg, {quality['sampler_steps']} Heun steps) | "
             f"{g['value']:.4f} | {100 * g['label_agreement']:.2f} | {g['n']:,} |",
             f"| real held-out images ({f['source']}) | {f['value']:.4f} | {100 * f['label_agreement']:.2f} | "
             f"{f['n']:,} |", "",
             f"Classifier FD: Fréchet distance of the penultimate features of `{g['classifier']}` "
             f"({g['classifier_model']}, clean test accuracy "
             f"{100 * (g.get('classifier_test_clean_acc') or 0):.2f}%) against `{g['reference_source']}`; "
             "label agreement: that classifier's accuracy against the labels the images were generated for.", ""]
    key = "autoattack" if real.get("autoattack") is not None and gen.get("autoattack") is not None else "pgd_best"
    text = "no comparison (a run is missing)"
    if real.get(key) is not None and gen.get(key) is not None:
        diff = gen[key] - real[key]
        what = "AutoAttack" if key == "autoattack" else "test PGD"
        ratio = g["value"] / max(f["value"], 1e-12)
        text = (f"With generated data the {what} accuracy is {abs(diff):.2f} points "
                f"{'higher' if diff > 0 else 'lower' if diff < 0 else 'different'} than with real data only "
                f"({gen[key]:.2f}% vs {real[key]:.2f}%). The generated images are {ratio:.0f}× farther from real test "
                f"images than held-out real images are (classifier FD {g['value']:.3f} vs {f['value']:.3f}), and "
                f"the classifier agrees with {100 * g['label_agreement']:.1f}% of their labels "
                f"(real: {100 * f['label_agreement']:.1f}%).")
        text += (" Either way, a run of minutes cannot show the paper's effect: the paper's gains need a generator "
                 "trained to convergence, generated data of at least ten times the real set and training long "
                 "enough to overfit robustly; experiments/README.md reports what the longer studies on this CPU "
                 "show.")
    lines.append(text)
    return {"markdown": "\n".join(lines) + "\n", "text": text}
