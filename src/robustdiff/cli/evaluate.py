"""robustdiff-eval: clean / PGD-40 / AutoAttack accuracy of a training run or a checkpoint, and export.

    robustdiff-eval RUN_DIR_OR_CHECKPOINT [--dataset D] [--norm linf|l2] [--eps 8/255] [--n-examples N]
                    [--batch-size 128] [--attacks clean,pgd,autoattack] [--seed 0] [--data-dir DIR]
                    [--out DIR] [--device cpu|cuda] [--no-wandb | --wandb-project P [--wandb-entity E]]
    robustdiff-eval export RUN_DIR_OR_CHECKPOINT --out model.pt [--card card.json] ...

Settings come from the run's run.json when given a run directory; every flag given on the command
line overrides it (never the other way round), and eval.json records where each setting came from.
An interrupted AutoAttack resumes when the same command is run again (state under OUT/autoattack_state/).
Results of a run that logged to W&B (logger=wandb: wandb.json in the run directory) are added to that same
W&B run (same id, resume="allow"; WANDB_MODE and WANDB_DIR apply); a checkpoint file's go to a new run of
job_type "eval" with --wandb-project.
A run directory literally named "export" must be written as ./export.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import os
import re
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

# torch and the evaluation modules are imported inside the functions that use them: --help answers at once.
if TYPE_CHECKING:
    import torch

from ..utils.lock import DirectoryLock, DirectoryLockedError
from .common import argument_parser

log = logging.getLogger("robustdiff.eval")

ATTACKS = ("clean", "pgd", "autoattack")
DEFAULT_EPS = {"linf": 8 / 255, "l2": 128 / 255}


def parse_count(text: str) -> int:
    """'20M' -> 20_000_000, '500K' -> 500_000, '1000' -> 1000."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmM]?)\s*", str(text))
    if not m:
        raise argparse.ArgumentTypeError(f"cannot read a count from {text!r} (write e.g. 1000, 500K or 20M)")
    scale = {"": 1, "k": 1000, "m": 1_000_000}[m.group(2).lower()]
    return round(float(m.group(1)) * scale)


def _csv(choices: Sequence[str] | Callable[[], Sequence[str]]):
    def parse(text: str) -> list[str]:
        nonlocal choices
        choices = choices() if callable(choices) else choices
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if t not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(choices)} (comma-separated), got {text!r}")
        return items
    return parse


def _standard_attacks() -> tuple[str, ...]:
    from ..evaluation.robustness import STANDARD_ATTACKS  # torch: only when --aa-attacks is given

    return STANDARD_ATTACKS


def _add_common(p: argparse.ArgumentParser) -> None:
    # default=None everywhere: "not given" must stay distinguishable from "given the default value".
    p.add_argument("target", type=Path, help="a run directory (with run.json) or a checkpoint file")
    p.add_argument("--dataset", default=None, help="dataset name (default: from run.json)")
    p.add_argument("--norm", choices=("linf", "l2"), default=None, help="threat model (default: from run.json)")
    p.add_argument("--eps", default=None, help="radius for images in [0, 1], e.g. 8/255 (default: from run.json)")
    p.add_argument("--weights", choices=("ema", "live"), default="ema",
                   help="which weights of a reference checkpoint holding both (default ema)")
    p.add_argument("--n-generated", type=parse_count, default=None,
                   help="generated images used in training, for the paper comparison (default: from run.json)")


def build_parser() -> argparse.ArgumentParser:
    p = argument_parser("robustdiff-eval", description=__doc__.split("\n\n")[0],
                        epilog="robustdiff-eval export RUN_OR_CHECKPOINT --out model.pt [--card card.json]: the model "
                               "in RobustBench's layout, checked to give the same logits, with an optional model "
                               "card (robustdiff-eval export --help)")
    _add_common(p)
    p.add_argument("--step", default=None, help="PGD step size (default: the run's step, else eps/4)")
    p.add_argument("--pgd-steps", type=int, default=None,
                   help="PGD iterations (default: the run's eval.steps from run.json, else 40)")
    p.add_argument("--pgd-loss", choices=("ce", "cw"), default=None,
                   help="PGD loss (default: the run's eval.test_loss from run.json, else ce)")
    p.add_argument("--n-examples", type=int, default=None, help="first N test images (default: all)")
    p.add_argument("--batch-size", type=int, default=None, help="batch size (default 128)")
    p.add_argument("--attacks", type=_csv(ATTACKS), default=None, help="default clean,pgd,autoattack")
    p.add_argument("--aa-attacks", type=_csv(_standard_attacks), default=None,
                   help="a subset of AutoAttack's attacks for a quick look (default: all four = standard)")
    p.add_argument("--aa-targets", type=int, default=None,
                   help="target classes of APGD-T/FAB-T (standard 9; fewer is cheaper and weaker, and is recorded)")
    p.add_argument("--seed", type=int, default=None, help="attack seed (default 0)")
    p.add_argument("--data-dir", default=None, help="dataset directory (default: from run.json, else ./data)")
    p.add_argument("--out", type=Path, default=None,
                   help="output directory for eval.json / eval.md (default: the run directory, or "
                        "<checkpoint stem>_eval beside a checkpoint file)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... or auto (default: auto = cuda when available)")
    p.add_argument("--expected-clean", type=float, default=None,
                   help="recorded clean accuracy (fraction or %%) to check an imported model against "
                        "(default: the run's summary.json, else the paper's number for the setting)")
    p.add_argument("--no-resume", action="store_true", help="don't keep or use AutoAttack resume state")
    p.add_argument("--no-wandb", action="store_true",
                   help="don't add the results to the training run's W&B run (wandb.json in the run directory)")
    p.add_argument("--wandb-project", default=None,
                   help="log the results to a new W&B run (job_type eval) of this project when the target has no "
                        "W&B run of its own (a checkpoint file, a run trained without logger=wandb)")
    p.add_argument("--wandb-entity", default=None)
    return p


def build_export_parser() -> argparse.ArgumentParser:
    p = argument_parser("robustdiff-eval export",
                        description="Export a run's model (or a checkpoint) in RobustBench's layout")
    _add_common(p)
    p.add_argument("--out", type=Path, required=True, help="output .pt (plain DMWideResNet state dict)")
    p.add_argument("--card", type=Path, default=None, help="also write a RobustBench model-info JSON here")
    p.add_argument("--overwrite", action="store_true", help="replace existing --out/--card files")
    p.add_argument("--eval-json", type=Path, default=None,
                   help="eval.json with the accuracies for the card (default: the run directory's)")
    p.add_argument("--name", default=None, help="the card's model name (default: the run's name)")
    p.add_argument("--authors", default=None, help="the card's authors: yours (default: empty)")
    p.add_argument("--link", default=None, help="the card's link to your paper or code (default: empty)")
    p.add_argument("--venue", default=None, help="the card's venue (default: empty)")
    return p


# --- settings ----------------------------------------------------------------------------------------

def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SystemExit(f"robustdiff-eval: {path} is not valid JSON ({e})") from None


def resolve_settings(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, str]]:
    """Merge defaults < run.json < command line. Returns (settings, source of each setting)."""
    import torch

    from ..data.datasets import get_info
    from ..evaluation.robustness import STANDARD_ATTACKS, EpsilonError, parse_eps

    target: Path = args.target
    run = _read_json(target / "run.json") if target.is_dir() else None
    if target.is_dir() and run is None:
        raise SystemExit(f"robustdiff-eval: {target} is a directory without run.json; give a run directory or a "
                         "checkpoint file")
    if not target.exists():
        raise SystemExit(f"robustdiff-eval: {target} does not exist")
    summary = _read_json(target / "summary.json") if run is not None else None
    settings: dict[str, Any] = {}
    sources: dict[str, str] = {}

    def put(key: str, flag_value: Any, run_value: Any, default: Any) -> None:
        if flag_value is not None:
            settings[key], sources[key] = flag_value, "flag"
        elif run_value is not None:
            settings[key], sources[key] = run_value, "run.json"
        else:
            settings[key], sources[key] = default, "default"

    rnorm = (run or {}).get("norm") or {}
    put("dataset", args.dataset, (run or {}).get("dataset"), None)
    if settings["dataset"] is None:
        raise SystemExit(f"robustdiff-eval: {target} is a checkpoint file; --dataset is required")
    get_info(settings["dataset"])
    put("norm", args.norm, rnorm.get("name"), "linf")
    # The run's ε (and step) belong to the run's norm; with --norm overriding it they don't apply.
    same_norm = sources["norm"] != "flag" or args.norm == rnorm.get("name")
    try:
        eps_flag = parse_eps(args.eps, settings["norm"]) if args.eps is not None else None
        put("eps", eps_flag, rnorm.get("eps") if same_norm else None, DEFAULT_EPS[settings["norm"]])
        if sources["eps"] == "run.json":
            parse_eps(settings["eps"], settings["norm"])
    except EpsilonError as e:
        raise SystemExit(f"robustdiff-eval: {e}") from None
    settings["name"] = (run or {}).get("name") or target.stem
    settings["model_path"] = str(target / "model.pt" if run is not None else target)
    if hasattr(args, "n_examples"):
        put("step", float(parse_eps(args.step, settings["norm"])) if args.step is not None else None,
            rnorm.get("step") if same_norm and sources["eps"] == "run.json" else None, settings["eps"] / 4)
        # The run's own PGD (steps and test-set loss) unless a flag says otherwise: the numbers eval prints are
        # then comparable with the run's per-epoch test PGD.
        run_eval = (run or {}).get("eval") or {}
        put("pgd_steps", args.pgd_steps, run_eval.get("steps"), 40)
        put("pgd_loss", args.pgd_loss, run_eval.get("test_loss"), "ce")
        put("n_examples", args.n_examples, None, None)
        put("batch_size", args.batch_size, None, 128)
        put("attacks", args.attacks, None, list(ATTACKS))
        put("aa_attacks", args.aa_attacks, None, list(STANDARD_ATTACKS))
        put("aa_targets", args.aa_targets, None, 9)
        put("seed", args.seed, None, 0)
        put("data_dir", args.data_dir, (run or {}).get("data_dir"), None)
        put("device", None if args.device == "auto" else args.device, None,
            "cuda" if torch.cuda.is_available() else "cpu")
        put("expected_clean", args.expected_clean, (summary or {}).get("test_clean_acc_best"), None)
    put("n_generated", args.n_generated, (run or {}).get("n_generated"), 0)
    model = (run or {}).get("model") or {}
    settings["epochs"] = (run or {}).get("epochs")
    settings["ratio"] = (run or {}).get("ratio")
    settings["run_model"] = f"wrn-{model['depth']}-{model['width']}" if model.get("depth") else model.get("name")
    return settings, sources


def unfinished_run_warning(target: Path) -> str | None:
    """For a run directory whose training has not finished: what its model.pt is and how to finish it."""
    if not (target.is_dir() and (target / "run.json").is_file()):
        return None
    summary = _read_json(target / "summary.json") or {}
    if summary.get("finished") is True:
        return None
    epochs = (_read_json(target / "run.json") or {}).get("epochs")
    done = summary.get("last_epoch")
    progress = f"trained {done} of {epochs} epochs" if done is not None else "no epoch finished"
    return (f"{target} is an unfinished run ({progress}): its model.pt is the best epoch so far, not the trained "
            f"model — rerun the run's robustdiff-train command to finish it, then evaluate or export again")


# --- evaluate ----------------------------------------------------------------------------------------

def _test_tensors(dataset: str, data_dir: str | None, n: int | None, device: torch.device):
    import torch

    from ..data.datasets import load_split

    images, labels = load_split(dataset, "test", data_dir)
    if n is not None:
        if n < 1:
            raise SystemExit("robustdiff-eval: --n-examples must be >= 1")
        images, labels = images[:n], labels[:n]
    x = torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float().div_(255)
    return x.contiguous(), torch.from_numpy(labels).to(device)


def output_dir(args: argparse.Namespace) -> Path:
    return args.out if args.out is not None else (
        args.target if args.target.is_dir() else args.target.with_name(args.target.stem + "_eval"))


def check_output(out: Path) -> None:
    """Before any attack: the output directory can be written, and an eval.json there is one of ours."""
    if out.exists() and not out.is_dir():
        raise SystemExit(f"robustdiff-eval: --out {out} is a file; give a directory (eval.json and eval.md go there)")
    existing = out / "eval.json"
    if existing.is_file():
        try:
            ours = "settings" in json.loads(existing.read_text())
        except (OSError, ValueError):
            ours = False
        if not ours:
            raise SystemExit(f"robustdiff-eval: {existing} exists and is not a robustdiff-eval result; choose another "
                             f"--out (nothing was overwritten)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as e:
        raise SystemExit(f"robustdiff-eval: cannot write results to {out} ({e.strerror or e}); fix its permissions "
                         f"or pass --out DIR — checked before any attack runs") from None


def run_evaluation(args: argparse.Namespace) -> dict[str, Any]:
    s, sources = resolve_settings(args)
    out = output_dir(args)
    created = not out.exists()
    check_output(out)
    try:
        lock = DirectoryLock(out, "robustdiff-eval").acquire()  # training or another eval writing here: refuse
    except DirectoryLockedError as e:
        raise SystemExit(f"robustdiff-eval: {e}") from None
    try:
        return _run_evaluation(args, s, sources, out)
    finally:
        lock.release()
        if created and {p.name for p in out.iterdir()} <= {lock.path.name}:
            # Refused before any result was written: no folder holding only a lock file is left behind.
            with contextlib.suppress(OSError):
                lock.path.unlink(missing_ok=True)
                out.rmdir()


def _run_evaluation(args: argparse.Namespace, s: dict[str, Any], sources: dict[str, str], out: Path) -> dict[str, Any]:
    import torch

    from ..data.datasets import get_info
    from ..evaluation.robustness import (
        clean_accuracy_warning,
        evaluate_autoattack,
        evaluate_clean,
        evaluate_pgd,
        format_eps,
        paper_result,
        paper_result_dict,
        write_eval_results,
    )
    from ..models.loading import CheckpointError, load_wideresnet

    for key in ("dataset", "norm", "eps", "n_examples", "attacks", "pgd_steps", "pgd_loss", "seed"):
        log.info("setting %s = %s (%s)", key, format_eps(s[key]) if key == "eps" else s[key], sources[key])
    device = torch.device(s["device"])
    try:
        model = load_wideresnet(s["model_path"], dataset=s["dataset"], weights=args.weights).to(device)
    except (CheckpointError, FileNotFoundError) as e:
        raise SystemExit(f"robustdiff-eval: {e}") from None
    arch = f"wrn-{model.depth}-{model.width}"
    s["model"] = arch
    if s["run_model"] and s["run_model"] != arch:
        log.warning("run.json names model %s but %s holds a %s", s["run_model"], s["model_path"], arch)
    paper = paper_result(s["dataset"], s["norm"], arch, s["n_generated"], epochs=s.get("epochs"), eps=s["eps"])
    if s["expected_clean"] is None and paper is not None and paper.clean is not None:
        s["expected_clean"], sources["expected_clean"] = paper.clean / 100, "paper"
    elif s["expected_clean"] is not None and s["expected_clean"] > 1:
        s["expected_clean"] /= 100  # given in percent
    x, y = _test_tensors(s["dataset"], s["data_dir"], s["n_examples"], device)
    results: dict[str, Any] = {
        "settings": {k: v for k, v in s.items() if k != "run_model"},
        "sources": sources,
        "n_examples": len(y),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "clean": None, "pgd": None, "autoattack": None, "warnings": [],
    }
    if (unfinished := unfinished_run_warning(args.target)) is not None:
        log.warning(unfinished)
        results["warnings"].append(unfinished)
    num_classes = get_info(s["dataset"]).num_classes
    if "clean" in s["attacks"] or s["expected_clean"] is not None:
        results["clean"] = evaluate_clean(model, x, y, batch_size=s["batch_size"])
        log.info("clean accuracy: %.2f%% (%d/%d)", 100 * results["clean"]["acc"], results["clean"]["n_correct"], len(y))
        warning = clean_accuracy_warning(results["clean"]["acc"], s["expected_clean"], len(y), num_classes,
                                         what=s["model_path"])
        if warning:
            log.warning(warning)
            results["warnings"].append(warning)
    if "pgd" in s["attacks"]:
        log.info("PGD-%d (%s loss) ...", s["pgd_steps"], s["pgd_loss"])
        results["pgd"] = evaluate_pgd(model, x, y, norm=s["norm"], eps=s["eps"], step=s["step"],
                                      steps=s["pgd_steps"], loss=s["pgd_loss"], batch_size=s["batch_size"],
                                      seed=s["seed"])
        log.info("PGD-%d accuracy: %.2f%%", s["pgd_steps"], 100 * results["pgd"]["acc"])
    if "autoattack" in s["attacks"]:
        state_dir = None
        if not args.no_resume:
            state_dir = Path(out) / "autoattack_state"
            state_dir.mkdir(parents=True, exist_ok=True)
        aa = evaluate_autoattack(model, x, y, norm=s["norm"], eps=s["eps"], batch_size=s["batch_size"],
                                 seed=s["seed"], state_path=state_dir, device=device, attacks=s["aa_attacks"],
                                 targets=s["aa_targets"])
        results["autoattack"] = aa
        log.info("AutoAttack (%s) robust accuracy: %.2f%% in %.0f s", aa["version"], 100 * aa["robust_acc"],
                 aa["seconds"])
        results["warnings"] += [f"AutoAttack: {m}" for m in aa["warnings"]]
    if len(y) < get_info(s["dataset"]).n_test:
        results["warnings"].append(f"evaluated on the first {len(y)} of {get_info(s['dataset']).n_test} test "
                                   "images; the paper's numbers are on the full test set")
    results["paper"] = paper_result_dict(paper)
    json_path, md_path, kept = write_eval_results(out, results)
    log.info("wrote %s and %s (this evaluation is also kept as %s)", json_path, md_path, kept)
    log_to_wandb(args, s, results)
    return results


def wandb_metrics(results: dict[str, Any]) -> dict[str, Any]:
    """eval.json's numbers as W&B keys (``eval/...``): accuracies as fractions, ε as a number and as text."""
    from ..evaluation.robustness import format_eps

    s = results["settings"]
    out: dict[str, Any] = {"eval/n_examples": results["n_examples"], "eval/eps": float(s["eps"]),
                           "eval/eps_text": format_eps(s["eps"]), "eval/norm": s["norm"]}
    if results.get("clean"):
        out["eval/clean_acc"] = results["clean"]["acc"]
    if results.get("pgd"):
        out.update({"eval/pgd_acc": results["pgd"]["acc"], "eval/pgd_steps": s["pgd_steps"],
                    "eval/pgd_loss": s["pgd_loss"], "eval/pgd_step": float(s["step"])})
    aa = results.get("autoattack")
    if aa:
        out.update({"eval/autoattack_acc": aa["robust_acc"], "eval/autoattack_version": aa["version"],
                    "eval/autoattack_attacks": ",".join(s["aa_attacks"])})
    return out


def log_to_wandb(args: argparse.Namespace, settings: dict[str, Any], results: dict[str, Any]) -> None:
    """Add the results to the run directory's W&B run (the training's: same id), else, with --wandb-project, to a
    new run of job_type eval. A W&B failure is reported, never fatal: eval.json is already written."""
    if args.no_wandb:
        return
    from ..training.logging import resolve_mode, resume_run

    try:
        if args.target.is_dir():
            run = resume_run(args.target)
        else:
            run = None
        if run is None and args.wandb_project:
            import wandb

            run = wandb.init(project=args.wandb_project, entity=args.wandb_entity, job_type="eval",
                             name=f"eval-{settings['name']}", mode=resolve_mode("auto"),
                             dir=os.environ.get("WANDB_DIR") or str(output_dir(args)),
                             config={"target": str(args.target), **{k: v for k, v in settings.items()
                                                                     if isinstance(v, (int, float, str))}})
        if run is None:
            return
        metrics = wandb_metrics(results)
        run.log(metrics)
        run.summary.update(metrics)
        log.info("added the results to W&B run %s (%s)", run.id, run.project)
        run.finish()
    except Exception as e:  # noqa: BLE001 (any W&B error: the results are safe in eval.json)
        log.warning("could not log the results to W&B (%s: %s); they are in eval.json", type(e).__name__, e)


# --- export ------------------------------------------------------------------------------------------

def check_export_paths(args: argparse.Namespace) -> None:
    """Before any work: no silent overwrite, no file written into another run's directory."""
    from ..data.store import StoreError, check_new_file

    own = args.target.resolve() if args.target.is_dir() else args.target.resolve().parent
    for flag, path in (("--out", args.out), ("--card", args.card)):
        if path is None:
            continue
        parent = path.resolve().parent
        if (parent / "run.json").is_file() and parent != own:
            raise SystemExit(f"robustdiff-eval export: {flag} {path} is inside another run directory ({parent}); "
                             f"write exports elsewhere — robustdiff never writes into a run it does not own")
        try:
            check_new_file(path, args.overwrite, f"robustdiff-eval export {flag}")
        except StoreError as e:
            raise SystemExit(str(e)) from None


def run_export(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from ..data.datasets import get_info
    from ..evaluation.export import export_robustbench, model_card, write_model_card
    from ..models.loading import CheckpointError, extract_state_dict, infer_architecture, load_wideresnet

    check_export_paths(args)
    s, _ = resolve_settings(args)
    try:
        model = load_wideresnet(s["model_path"], dataset=s["dataset"], weights=args.weights)
    except (CheckpointError, FileNotFoundError) as e:
        raise SystemExit(f"robustdiff-eval export: {e}") from None
    path = export_robustbench(model, args.out)
    # Self-check: the exported file loads strictly into a fresh model and gives the same logits.
    exported = torch.load(path, map_location="cpu", weights_only=True)
    arch = infer_architecture(extract_state_dict(exported, source=str(path)), str(path))
    fresh = load_wideresnet(exported, dataset=s["dataset"])
    probe = torch.rand((4, arch.in_channels) + get_info(s["dataset"]).image_shape[:2],
                       generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        if not torch.equal(model(probe), fresh(probe)):
            raise RuntimeError(f"{path}: the exported model does not reproduce the original logits")
    log.info("wrote %s (%s, %d classes)", path, arch.robustbench_name, arch.num_classes)
    result: dict[str, Any] = {"model": str(path), "architecture": arch.robustbench_name, "card": None, "warnings": []}
    if (unfinished := unfinished_run_warning(args.target)) is not None:
        result["warnings"].append(unfinished)
    if args.card is not None:
        eval_path = args.eval_json or (args.target / "eval.json" if args.target.is_dir() else None)
        ev = _read_json(eval_path) if eval_path is not None else None
        clean = aa = None
        if ev is None:
            result["warnings"].append("no eval.json: the card has no accuracies; run robustdiff-eval first")
        else:
            clean = (ev.get("clean") or {}).get("acc")
            aa_res = ev.get("autoattack") or {}
            if aa_res.get("version") == "standard":
                aa = aa_res.get("robust_acc")
            elif aa_res:
                result["warnings"].append("eval.json holds a subset of AutoAttack; the card's autoattack_acc is empty")
            info = get_info(s["dataset"])
            if ev.get("n_examples", 0) < info.n_test:
                result["warnings"].append(f"eval.json covers {ev.get('n_examples')} of {info.n_test} test images; "
                                          "RobustBench reports the full test set")
        card = model_card(dataset=s["dataset"], norm=s["norm"], eps=s["eps"], architecture=arch, clean_acc=clean,
                          autoattack_acc=aa, n_generated=s["n_generated"], name=args.name or s["name"],
                          link=args.link, authors=args.authors, venue=args.venue)
        empty = [f"--{k}" for k in ("authors", "link", "venue") if not card[k]]
        if empty:
            result["warnings"].append(f"the card's {', '.join(k[2:] for k in empty)} are empty: pass {' '.join(empty)} "
                                      "(yours, not the paper's) before submitting it to RobustBench")
        write_model_card(card, args.card)
        result["card"] = card
        log.info("wrote %s", args.card)
    for w in result["warnings"]:
        log.warning(w)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    if argv and argv[0] == "export":
        run_export(build_export_parser().parse_args(argv[1:]))
    else:
        run_evaluation(build_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
