"""robustdiff-demo: the whole pipeline of the paper, shrunk to minutes on a CPU (Fashion-MNIST).

    1. train a small class-conditional EDM                       <out>/generator/edm       (robustdiff-edm)
    2. sample a labelled store from it                           <out>/generator/store     (robustdiff-generate)
    3. measure the store: a classifier trained normally on real  <out>/generator/classifier,
       data, its classifier FD and label agreement, and the       quality/                 (robustdiff-fid)
       same numbers for held-out real images
    4. TRADES without and with the generated images              <out>/runs/{real,generated} (robustdiff-train)
    5. AutoAttack on the first test images, for both             <out>/runs/*/eval.json    (robustdiff-eval)
    6. a report comparing the two, with the generator's quality  <out>/report.md, figures/ (robustdiff-report)

Every stage reuses its directory: re-running the command finishes what an interruption left and skips what
is done. Each stage is the same code the individual commands run, composed from the same Hydra configs
(conf/train_edm.yaml, conf/generate.yaml, conf/train.yaml with experiment=fashionmnist_demo), so any
stage can be redone by hand with the overrides this prints. A demonstration, not a paper setting: a
generator trained for minutes gives poor images — the report shows how poor (classifier FD, label agreement
against held-out real images) and points to `make study` for what better generators do.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir

from ..utils.io import atomic_write_text
from .common import argument_parser
from .hydra_conf import CONF_DIR


def build_parser() -> argparse.ArgumentParser:
    p = argument_parser("robustdiff-demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="demo directory (default runs/demo)")
    p.add_argument("--data-dir", default="data", help="dataset directory (default: data, then Debian's location)")
    g = p.add_argument_group("generator")
    g.add_argument("--edm-kimg", type=float, default=6.4, help="EDM training length in thousands of images")
    g.add_argument("--edm-limit-train", type=int, default=None, help="EDM on the first N training images only")
    g.add_argument("--n-generated", type=int, default=1000, help="images in the store (multiple of 10)")
    g.add_argument("--sampler-steps", type=int, default=4, help="Heun steps per image (2·steps − 1 evaluations)")
    q = p.add_argument_group("generator quality (robustdiff-fid)")
    q.add_argument("--classifier-limit-train", type=int, default=12288,
                   help="the measuring classifier trains (loss=ce) on the first N real training images")
    q.add_argument("--classifier-epochs", type=int, default=2)
    q.add_argument("--fd-reference", type=int, default=2000, help="FD reference: the first N test images")
    q.add_argument("--floor-start", type=int, default=50000,
                   help="held-out real training images from here (as many as the store) give the FD floor")
    t = p.add_argument_group("adversarial training (experiment=fashionmnist_demo, reduced)")
    t.add_argument("--model", default="wrn-10-1", help="model config (default wrn-10-1)")
    t.add_argument("--epochs", type=int, default=2)
    t.add_argument("--batch-size", type=int, default=128)
    t.add_argument("--limit-train", type=int, default=8192, help="first N real training images (1,024 validate)")
    t.add_argument("--val-size", type=int, default=1024)
    t.add_argument("--limit-test", type=int, default=1000, help="test images for the per-epoch clean accuracy")
    t.add_argument("--ratio", type=float, default=0.5, help="real fraction of each batch in the generated run")
    t.add_argument("--train-override", action="append", default=[], metavar="KEY=VALUE",
                   help="more robustdiff-train overrides for both runs (repeatable), e.g. norm.steps=3")
    e = p.add_argument_group("evaluation")
    e.add_argument("--n-examples", "--aa-n", dest="aa_n", type=int, default=100,
                   help="AutoAttack on the first N test images, as robustdiff-eval --n-examples (--aa-n: the "
                        "same, an older spelling)")
    # The standard four (apgd-ce,apgd-t,fab-t,square) take far longer than training here on a 2-core CPU.
    e.add_argument("--aa-attacks", default="apgd-ce",
                   help="AutoAttack's attacks (default apgd-ce; 'standard' = all four, the paper's evaluation)")
    return p


def _compose(config_name: str, overrides: Sequence[str]):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name, overrides=list(overrides))


def _stage(title: str, command: str):
    print(f"\n=== robustdiff-demo: {title}\n    same as: {command}", flush=True)
    return time.monotonic()


def run_demo(args: argparse.Namespace) -> dict:
    """Run (or resume) every stage; returns {"report": path, "rows": [...], "seconds": {stage: s}}."""
    from ..cli.evaluate import build_parser as eval_parser
    from ..cli.evaluate import run_evaluation
    from ..diffusion.generate import generate
    from ..evaluation.report import write_report
    from ..training.diffusion import train_edm
    from ..training.run import train

    out = args.out
    seconds: dict[str, float] = {}

    edm_dir = out / "generator" / "edm"
    edm = [f"run_root={edm_dir.parent}", f"name={edm_dir.name}", "dataset=fashionmnist", "edm=small",
           f"edm.duration_kimg={args.edm_kimg}", f"edm.snapshot_kimg={args.edm_kimg}", "logger=csv",
           "grid.rows=1", "grid.steps=8", f"data_dir={args.data_dir}", "trainer.enable_progress_bar=false"]
    if args.edm_limit_train:
        edm.append(f"limit_train={args.edm_limit_train}")
    t0 = _stage("1/6 EDM generator", "robustdiff-edm " + " ".join(edm))
    _require_finished(train_edm(_compose("train_edm", edm), edm_dir), edm_dir)
    seconds["edm"] = time.monotonic() - t0

    store = out / "generator" / "store"
    gen = [f"network={edm_dir / 'network.pt'}", f"n={args.n_generated}", f"out={store}",
           f"steps={args.sampler_steps}", "dataset=fashionmnist", "progress=false"]
    t0 = _stage("2/6 generated store", "robustdiff-generate " + " ".join(gen))
    generate(_compose("generate", gen))  # a complete store of this same generation is left as it is
    seconds["generate"] = time.monotonic() - t0

    t0 = _stage("3/6 generator quality", f"robustdiff-fid score {store} --ref {out / 'quality' / 'reference.npz'} "
                f"--classifier {out / 'generator' / 'classifier'}")
    quality = measure_generator(args, out, store)
    seconds["quality"] = time.monotonic() - t0

    runs_root = out / "runs"
    common = ["experiment=fashionmnist_demo", f"model={args.model}", f"epochs={args.epochs}",
              f"batch_size={args.batch_size}", f"limit_train={args.limit_train}", f"val_size={args.val_size}",
              f"limit_test={args.limit_test}", f"data_dir={args.data_dir}", f"run_root={runs_root}",
              "trainer.enable_progress_bar=false", *args.train_override]
    variants = {"real": [], "generated": [f"generated={store}", f"ratio={args.ratio}"]}
    for i, (name, extra) in enumerate(variants.items()):
        overrides = [*common, f"name={name}", *extra]
        t0 = _stage(f"4/6 TRADES, {name} data ({i + 1}/2)", "robustdiff-train " + " ".join(overrides))
        _require_finished(train(_compose("train", overrides), runs_root / name), runs_root / name)
        seconds[f"train_{name}"] = time.monotonic() - t0

    for name in variants:
        run_dir = runs_root / name
        argv = [str(run_dir), "--n-examples", str(args.aa_n), "--attacks", "clean,autoattack"]
        if args.aa_attacks and args.aa_attacks != "standard":
            argv += ["--aa-attacks", args.aa_attacks]
        t0 = _stage(f"5/6 AutoAttack, {name}", "robustdiff-eval " + " ".join(argv))
        if _evaluated(run_dir, args.aa_n, args.aa_attacks):
            print(f"robustdiff-demo: {run_dir}/eval.json already has this evaluation; nothing to do.")
        else:
            run_evaluation(eval_parser().parse_args(argv))
        seconds[f"autoattack_{name}"] = time.monotonic() - t0

    t0 = _stage("6/6 report", f"robustdiff-report {runs_root} --out {out}")
    rows = write_report(runs_root, out, title="robustdiff demo: TRADES on Fashion-MNIST without and with generated data")
    report = out / "report.md"
    verdict = quality_section(quality, rows)
    atomic_write_text(report, report.read_text().rstrip() + "\n\n" + verdict["markdown"])
    seconds["report"] = time.monotonic() - t0
    print(f"\nrobustdiff-demo: {report}")
    for r in rows:
        print(f"  {r['run']:>9}: clean {_pct(r['eval_clean'] or r['clean_best'])}, "
              f"AutoAttack {_pct(r['autoattack'])} on {r['eval_n']} test images "
              f"(PGD-{r['pgd_steps'] or '?'} best epoch {_pct(r['pgd_best'])})")
    print("  " + verdict["text"])
    print("  stage seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))
    return {"report": report, "rows": rows, "seconds": seconds, "quality": quality}


def measure_generator(args: argparse.Namespace, out: Path, store: Path) -> dict:
    """A classifier trained normally on real data, then the store's classifier FD and label agreement against
    held-out test images, and the same for as many held-out real training images (the floor)."""
    from ..evaluation.generative import reference_and_floor, score_store
    from ..training.run import train
    from ..utils.io import atomic_write_json

    clf_dir = out / "generator" / "classifier"
    clf = ["experiment=fmnist_classifier", "model=wrn-10-1", f"epochs={args.classifier_epochs}",
           f"limit_train={args.classifier_limit_train}", f"val_size={min(1024, args.classifier_limit_train // 4)}",
           "batch_size=64", "ema_decay=0.99", "limit_test=2000",
           f"data_dir={args.data_dir}", f"run_root={clf_dir.parent}", f"name={clf_dir.name}",
           "trainer.enable_progress_bar=false", "logger=csv"]
    print("    classifier: robustdiff-train " + " ".join(clf), flush=True)
    _require_finished(train(_compose("train", clf), clf_dir), clf_dir)

    qdir = out / "quality"
    path = qdir / "quality.json"
    if path.is_file():
        return json.loads(path.read_text())
    ref_path = qdir / "reference.npz"
    floor = reference_and_floor(clf_dir, "fashionmnist", args.data_dir, ref_path, ("test", 0, args.fd_reference),
                                ("train", args.floor_start, args.n_generated))
    generated = score_store(store, ref_path, features="classifier", classifier=clf_dir, n=None)
    result = {"generated": generated, "floor": floor, "edm_kimg": args.edm_kimg, "sampler_steps": args.sampler_steps}
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


def _require_finished(summary: dict, run_dir: Path) -> None:
    if not summary.get("finished"):  # stopped by a signal: its state is saved, the next stages must wait
        raise SystemExit(f"robustdiff-demo: {run_dir} did not finish; run the same command again to resume")


def _pct(v) -> str:
    return "—" if v is None else f"{v:.2f}%"


def _evaluated(run_dir: Path, n: int, attacks: str | None) -> bool:
    path = run_dir / "eval.json"
    if not path.is_file():
        return False
    e = json.loads(path.read_text())
    aa = e.get("autoattack") or {}
    trained = (run_dir / "model.pt").stat().st_mtime if (run_dir / "model.pt").is_file() else 0
    wanted = sorted(attacks.split(",")) if attacks and attacks != "standard" else None
    return (e.get("n_examples") == n and aa.get("robust_acc") is not None and path.stat().st_mtime >= trained
            and (wanted is None or sorted(aa.get("attacks") or []) == wanted))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    run_demo(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
