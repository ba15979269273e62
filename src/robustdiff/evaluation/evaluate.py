"""Evaluate a training run or a checkpoint: clean, PGD and AutoAttack accuracy on the test set (what
``robustdiff-eval`` runs).

``evaluate(EvalRequest(target=...))`` resolves every setting — the request's own value, else the run's
``run.json``, else a default — and records where each came from; it then writes ``eval.json`` and ``eval.md``
into the output directory (the run directory, or ``<checkpoint stem>_eval`` beside a checkpoint file), keeps
AutoAttack's resume state under ``autoattack_state/`` there, and adds the results to the run's W&B run when it
has one. Whatever it refuses — a missing run, a bad setting, an output it cannot write — is an
``EvaluationError`` said in one line, raised before any attack runs.

torch and the attacks are imported inside the functions that use them: this module loads at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..utils.lock import DirectoryLock, DirectoryLockedError

if TYPE_CHECKING:
    import torch

log = logging.getLogger("robustdiff.eval")

ATTACKS = ("clean", "pgd", "autoattack")
DEFAULT_EPS = {"linf": 8 / 255, "l2": 128 / 255}


class EvaluationError(ValueError):
    """A target, setting or output robustdiff-eval refuses (``command`` names it in the one-line message)."""

    command = "robustdiff-eval"


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelTarget:
    """A run directory (with run.json) or a checkpoint file, and the threat model it is judged under.
    None: from run.json, else the default."""

    target: Path
    dataset: str | None = None
    norm: str | None = None  # linf | l2
    eps: str | float | None = None  # for images in [0, 1], e.g. "8/255"
    weights: str = "ema"  # ema | live: which weights of a reference checkpoint holding both
    n_generated: int | None = None  # generated images used in training, for the paper comparison


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalRequest(ModelTarget):
    """What to evaluate and how (robustdiff-eval's flags). None: from run.json, else the default."""

    step: str | float | None = None  # PGD step size (default: the run's step, else eps/4)
    pgd_steps: int | None = None  # default: the run's eval.steps, else 40
    pgd_loss: str | None = None  # ce | cw; default: the run's eval.test_loss, else ce
    n_examples: int | None = None  # the first N test images (default: all)
    batch_size: int | None = None  # default 128
    attacks: list[str] | None = None  # a subset of ATTACKS (default: all)
    aa_attacks: list[str] | None = None  # a subset of AutoAttack's attacks (default: the standard four)
    aa_targets: int | None = None  # target classes of APGD-T/FAB-T (default 9)
    seed: int | None = None  # default 0
    data_dir: str | None = None  # default: from run.json, else ./data
    out: Path | None = None  # default: the run directory, or <checkpoint stem>_eval beside a checkpoint file
    device: str | None = None  # cpu, gpu (= cuda), cuda, cuda:1, ... or auto (default: cuda when available)
    expected_clean: float | None = None  # fraction or %; default: the run's summary.json, else the paper's
    resume: bool = True  # keep and use AutoAttack resume state
    wandb: bool = True  # add the results to the run's own W&B run (wandb.json in the run directory)
    wandb_project: str | None = None  # else log them to a new W&B run (job_type eval) of this project
    wandb_entity: str | None = None


# --- settings ----------------------------------------------------------------------------------------

def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON file's content, None when there is no such file."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise EvaluationError(f"{path} is not valid JSON ({e})") from None


def resolve_settings(request: ModelTarget) -> tuple[dict[str, Any], dict[str, str]]:
    """Merge defaults < run.json < request. Returns (settings, source of each setting).

    An ``EvalRequest`` gets the attack settings too; a plain ``ModelTarget`` (an export) the model's only."""
    from ..data.datasets import get_info
    from ..utils.hardware import torch_device
    from .autoattack import STANDARD_ATTACKS
    from .robustness import EpsilonError, parse_eps

    target = request.target
    run = read_json(target / "run.json") if target.is_dir() else None
    if target.is_dir() and run is None:
        raise EvaluationError(f"{target} is a directory without run.json; give a run directory or a checkpoint file")
    if not target.exists():
        raise EvaluationError(f"{target} does not exist")
    summary = read_json(target / "summary.json") if run is not None else None
    settings: dict[str, Any] = {}
    sources: dict[str, str] = {}

    def put(key: str, given: Any, run_value: Any, default: Any) -> None:
        if given is not None:
            settings[key], sources[key] = given, "flag"
        elif run_value is not None:
            settings[key], sources[key] = run_value, "run.json"
        else:
            settings[key], sources[key] = default, "default"

    rnorm = (run or {}).get("norm") or {}
    put("dataset", request.dataset, (run or {}).get("dataset"), None)
    if settings["dataset"] is None:
        raise EvaluationError(f"{target} is a checkpoint file; --dataset is required")
    get_info(settings["dataset"])
    put("norm", request.norm, rnorm.get("name"), "linf")
    # The run's ε (and step) belong to the run's norm; with --norm overriding it they don't apply.
    same_norm = sources["norm"] != "flag" or request.norm == rnorm.get("name")
    try:
        eps_given = parse_eps(request.eps, settings["norm"]) if request.eps is not None else None
        put("eps", eps_given, rnorm.get("eps") if same_norm else None, DEFAULT_EPS[settings["norm"]])
        if sources["eps"] == "run.json":
            parse_eps(settings["eps"], settings["norm"])
    except EpsilonError as e:
        raise EvaluationError(str(e)) from None
    settings["name"] = (run or {}).get("name") or target.stem
    settings["model_path"] = str(target / "model.pt" if run is not None else target)
    if isinstance(request, EvalRequest):
        r = request
        put("step", float(parse_eps(r.step, settings["norm"])) if r.step is not None else None,
            rnorm.get("step") if same_norm and sources["eps"] == "run.json" else None, settings["eps"] / 4)
        # The run's own PGD (steps and test-set loss) unless a flag says otherwise: the numbers eval prints are
        # then comparable with the run's per-epoch test PGD.
        run_eval = (run or {}).get("eval") or {}
        put("pgd_steps", r.pgd_steps, run_eval.get("steps"), 40)
        put("pgd_loss", r.pgd_loss, run_eval.get("test_loss"), "ce")
        put("n_examples", r.n_examples, None, None)
        put("batch_size", r.batch_size, None, 128)
        put("attacks", r.attacks, None, list(ATTACKS))
        put("aa_attacks", r.aa_attacks, None, list(STANDARD_ATTACKS))
        put("aa_targets", r.aa_targets, None, 9)
        put("seed", r.seed, None, 0)
        put("data_dir", r.data_dir, (run or {}).get("data_dir"), None)
        try:
            device = None if r.device in (None, "auto") else str(torch_device(r.device))
        except ValueError as e:
            raise EvaluationError(str(e)) from None
        put("device", device, None, str(torch_device("auto")))
        put("expected_clean", r.expected_clean, (summary or {}).get("test_clean_acc_best"), None)
    put("n_generated", request.n_generated, (run or {}).get("n_generated"), 0)
    model = (run or {}).get("model") or {}
    settings["epochs"] = (run or {}).get("epochs")
    settings["ratio"] = (run or {}).get("ratio")
    settings["run_model"] = f"wrn-{model['depth']}-{model['width']}" if model.get("depth") else model.get("name")
    return settings, sources


def unfinished_run_warning(target: Path) -> str | None:
    """For a run directory whose training has not finished: what its model.pt is and how to finish it."""
    if not (target.is_dir() and (target / "run.json").is_file()):
        return None
    summary = read_json(target / "summary.json") or {}
    if summary.get("finished") is True:
        return None
    epochs = (read_json(target / "run.json") or {}).get("epochs")
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
            raise EvaluationError("--n-examples must be >= 1")
        images, labels = images[:n], labels[:n]
    x = torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float().div_(255)
    return x.contiguous(), torch.from_numpy(labels).to(device)


def output_dir(request: EvalRequest) -> Path:
    """Where eval.json goes: ``out``, else the run directory, else ``<checkpoint stem>_eval`` beside the file."""
    return request.out if request.out is not None else (
        request.target if request.target.is_dir() else request.target.with_name(request.target.stem + "_eval"))


def check_output(out: Path) -> None:
    """Before any attack: the output directory can be written, and an eval.json there is one of ours."""
    if out.exists() and not out.is_dir():
        raise EvaluationError(f"--out {out} is a file; give a directory (eval.json and eval.md go there)")
    existing = out / "eval.json"
    if existing.is_file():
        try:
            ours = "settings" in json.loads(existing.read_text())
        except (OSError, ValueError):
            ours = False
        if not ours:
            raise EvaluationError(f"{existing} exists and is not a robustdiff-eval result; choose another --out "
                                  f"(nothing was overwritten)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as e:
        raise EvaluationError(f"cannot write results to {out} ({e.strerror or e}); fix its permissions or pass "
                              f"--out DIR — checked before any attack runs") from None


def evaluate(request: EvalRequest) -> dict[str, Any]:
    """Evaluate ``request.target``; returns what eval.json holds (written, with eval.md, before returning)."""
    s, sources = resolve_settings(request)
    out = output_dir(request)
    created = not out.exists()
    check_output(out)
    try:
        lock = DirectoryLock(out, "robustdiff-eval").acquire()  # training or another eval writing here: refuse
    except DirectoryLockedError as e:
        raise EvaluationError(str(e)) from None
    try:
        return _evaluate(request, s, sources, out)
    finally:
        lock.release()
        if created and {p.name for p in out.iterdir()} <= {lock.path.name}:
            # Refused before any result was written: no folder holding only a lock file is left behind.
            with contextlib.suppress(OSError):
                lock.path.unlink(missing_ok=True)
                out.rmdir()


def _evaluate(request: EvalRequest, s: dict[str, Any], sources: dict[str, str], out: Path) -> dict[str, Any]:
    import torch

    from ..data.datasets import get_info
    from ..models.loading import CheckpointError, load_model, model_name
    from .autoattack import evaluate_autoattack
    from .paper import paper_result, paper_result_dict
    from .results import format_eps, write_eval_results
    from .robustness import clean_accuracy_warning, evaluate_clean, evaluate_pgd

    for key in ("dataset", "norm", "eps", "n_examples", "attacks", "pgd_steps", "pgd_loss", "seed"):
        log.info("setting %s = %s (%s)", key, format_eps(s[key]) if key == "eps" else s[key], sources[key])
    device = torch.device(s["device"])
    try:
        record = (read_json(request.target / "run.json") or {}).get("model") if request.target.is_dir() else None
        model = load_model(s["model_path"], dataset=s["dataset"], weights=request.weights, record=record).to(device)
    except (CheckpointError, FileNotFoundError) as e:
        raise EvaluationError(str(e)) from None
    arch = model_name(model, record)
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
    if (unfinished := unfinished_run_warning(request.target)) is not None:
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
        if request.resume:
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
    log_to_wandb(request, s, results)
    return results


# --- W&B ---------------------------------------------------------------------------------------------

def wandb_metrics(results: dict[str, Any]) -> dict[str, Any]:
    """eval.json's numbers as W&B keys (``eval/...``): accuracies as fractions, ε as a number and as text."""
    from .results import format_eps

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


def log_to_wandb(request: EvalRequest, settings: dict[str, Any], results: dict[str, Any]) -> None:
    """Add the results to the run directory's W&B run (the training's: same id), else, with ``wandb_project``, to a
    new run of job_type eval. A W&B failure is reported, never fatal: eval.json is already written."""
    if not request.wandb:
        return
    from ..training.logging import resolve_mode, resume_run

    try:
        if request.target.is_dir():
            run = resume_run(request.target)
        else:
            run = None
        if run is None and request.wandb_project:
            import wandb

            run = wandb.init(project=request.wandb_project, entity=request.wandb_entity, job_type="eval",
                             name=f"eval-{settings['name']}", mode=resolve_mode("auto"),
                             dir=os.environ.get("WANDB_DIR") or str(output_dir(request)),
                             config={"target": str(request.target), **{k: v for k, v in settings.items()
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
