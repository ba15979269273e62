"""robustdiff-demo: the whole pipeline of the paper, shrunk to minutes on a CPU (Fashion-MNIST).

    1. train a small class-conditional EDM                       <out>/generator/edm       (robustdiff-edm)
    2. sample a labelled store from it                           <out>/generator/store     (robustdiff-generate)
    3. TRADES without and with the generated images              <out>/runs/{real,generated} (robustdiff-train)
    4. AutoAttack on the first test images, for both             <out>/runs/*/eval.json    (robustdiff-eval)
    5. a report comparing the two                                <out>/report.md, figures/ (robustdiff-report)

Every stage reuses its directory: re-running the command finishes what an interruption left and skips what
is done. Each stage is the same code the individual commands run, composed from the same Hydra configs
(conf/train_edm.yaml, conf/generate.yaml, conf/train.yaml with experiment=fashionmnist_demo), so any
stage can be redone by hand with the overrides this prints. A demonstration, not a paper setting: a
generator trained for minutes gives poor images, so don't read the comparison as the paper's result.
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

from .train import CONF_DIR, EXPERIMENTS_DIR


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="robustdiff-demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="demo directory (default runs/demo)")
    p.add_argument("--data-dir", default="data", help="dataset directory (default: data, then Debian's location)")
    g = p.add_argument_group("generator")
    g.add_argument("--edm-kimg", type=float, default=6.4, help="EDM training length in thousands of images")
    g.add_argument("--edm-limit-train", type=int, default=None, help="EDM on the first N training images only")
    g.add_argument("--n-generated", type=int, default=1000, help="images in the store (multiple of 10)")
    g.add_argument("--sampler-steps", type=int, default=4, help="Heun steps per image (2·steps − 1 evaluations)")
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
    e.add_argument("--aa-n", type=int, default=100, help="AutoAttack on the first N test images")
    # The standard four (apgd-ce,apgd-t,fab-t,square) take far longer than training here on a 2-core CPU.
    e.add_argument("--aa-attacks", default="apgd-ce",
                   help="AutoAttack's attacks (default apgd-ce; 'standard' = all four, the paper's evaluation)")
    return p


def _compose(config_name: str, overrides: Sequence[str]):
    import robustdiff.training.run  # noqa: F401  (registers the rd_run_name resolver)

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name, overrides=[f"hydra.searchpath=[file://{EXPERIMENTS_DIR}]", *overrides])


def _stage(title: str, command: str):
    print(f"\n=== robustdiff-demo: {title}\n    same as: {command}", flush=True)
    return time.monotonic()


def run_demo(args: argparse.Namespace) -> dict:
    """Run (or resume) every stage; returns {"report": path, "rows": [...], "seconds": {stage: s}}."""
    from ..cli.evaluate import build_parser as eval_parser
    from ..cli.evaluate import run_evaluation
    from ..cli.generate import generate
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
    t0 = _stage("1/5 EDM generator", "robustdiff-edm " + " ".join(edm))
    _require_finished(train_edm(_compose("train_edm", edm), edm_dir), edm_dir)
    seconds["edm"] = time.monotonic() - t0

    store = out / "generator" / "store"
    gen = [f"network={edm_dir / 'network.pt'}", f"n={args.n_generated}", f"out={store}",
           f"steps={args.sampler_steps}", "dataset=fashionmnist", "progress=false"]
    t0 = _stage("2/5 generated store", "robustdiff-generate " + " ".join(gen))
    generate(_compose("generate", gen))  # a complete store of this same generation is left as it is
    seconds["generate"] = time.monotonic() - t0

    runs_root = out / "runs"
    common = ["experiment=fashionmnist_demo", f"model={args.model}", f"epochs={args.epochs}",
              f"batch_size={args.batch_size}", f"limit_train={args.limit_train}", f"val_size={args.val_size}",
              f"limit_test={args.limit_test}", f"data_dir={args.data_dir}", f"run_root={runs_root}",
              "trainer.enable_progress_bar=false", *args.train_override]
    variants = {"real": [], "generated": [f"generated={store}", f"ratio={args.ratio}"]}
    for i, (name, extra) in enumerate(variants.items()):
        overrides = [*common, f"name={name}", *extra]
        t0 = _stage(f"3/5 TRADES, {name} data ({i + 1}/2)", "robustdiff-train " + " ".join(overrides))
        _require_finished(train(_compose("train", overrides), runs_root / name), runs_root / name)
        seconds[f"train_{name}"] = time.monotonic() - t0

    for name in variants:
        run_dir = runs_root / name
        argv = [str(run_dir), "--n-examples", str(args.aa_n), "--attacks", "clean,autoattack"]
        if args.aa_attacks and args.aa_attacks != "standard":
            argv += ["--aa-attacks", args.aa_attacks]
        t0 = _stage(f"4/5 AutoAttack, {name}", "robustdiff-eval " + " ".join(argv))
        if _evaluated(run_dir, args.aa_n, args.aa_attacks):
            print(f"robustdiff-demo: {run_dir}/eval.json already has this evaluation; nothing to do.")
        else:
            run_evaluation(eval_parser().parse_args(argv))
        seconds[f"autoattack_{name}"] = time.monotonic() - t0

    t0 = _stage("5/5 report", f"robustdiff-report {runs_root} --out {out}")
    rows = write_report(runs_root, out)
    seconds["report"] = time.monotonic() - t0
    report = out / "report.md"
    print(f"\nrobustdiff-demo: {report}")
    for r in rows:
        print(f"  {r['run']:>9}: clean {_pct(r['eval_clean'] or r['clean_best'])}, "
              f"AutoAttack {_pct(r['autoattack'])} on {r['eval_n']} test images "
              f"(PGD-{r['pgd_steps'] or '?'} best epoch {_pct(r['pgd_best'])})")
    print("  stage seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))
    return {"report": report, "rows": rows, "seconds": seconds}


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
