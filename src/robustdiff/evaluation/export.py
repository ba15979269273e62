"""Export a WideResNet for RobustBench: a plain state dict its ``DMWideResNet`` loads strictly, and a model card.

``export_run`` is what ``robustdiff-eval export`` runs: a run directory's model (or a checkpoint's), checked to
give the same logits once exported, and its card with the accuracies of the run's eval.json. Checkpoints are
read by ``robustdiff.models.loading`` (`load_wideresnet`). A run of another architecture (run.json's
``model._target_``) exports as its state dict plus its model config; RobustBench names and cards are WRN-only.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..models.loading import Architecture, is_wideresnet_record
from ..models.wrn import WideResNet
from ..utils.formatting import format_pct
from ..utils.io import atomic_torch_save, atomic_write_json
from .evaluate import EvaluationError, ModelTarget, read_json, resolve_settings, unfinished_run_warning
from .results import format_count, format_eps
from .robustness import check_eps

log = logging.getLogger("robustdiff.eval")


def export_robustbench(model: WideResNet, path: str | os.PathLike) -> Path:
    """Save the model as a plain, unprefixed state dict (what RobustBench's DMWideResNet loads strictly)."""
    state_dict = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    atomic_torch_save(state_dict, path)
    return Path(path)


def model_card(
    *,
    dataset: str,
    norm: str,
    eps: float,
    architecture: Architecture | str,
    clean_acc: float | None,
    autoattack_acc: float | None,
    n_generated: int,
    reported: float | None = None,
    name: str | None = None,
    link: str | None = None,
    authors: str | None = None,
    venue: str | None = None,
) -> dict[str, Any]:
    """A RobustBench model-info card. Accuracies are fractions in [0, 1] here, written as '%.2f' percent.

    ``reported`` defaults to ``autoattack_acc``. name/link/authors/venue describe *your* model: they are
    what you pass (None leaves the field empty; RobustBench needs them filled for a submission), never the
    paper whose method trained it.
    """
    eps = check_eps(norm, eps)
    arch = architecture.robustbench_name if isinstance(architecture, Architecture) else architecture
    footnote = (f"It uses additional {format_count(n_generated)} synthetic images in training."
                if n_generated else None)
    return {
        "link": link,
        "name": name,
        "authors": authors,
        "additional_data": False,  # RobustBench counts generated images as no additional data (see footnote)
        "number_forward_passes": 1,
        "dataset": dataset,
        "venue": venue,
        "architecture": arch,
        "eps": format_eps(eps),
        "clean_acc": format_pct(clean_acc, missing=None),
        "reported": format_pct(reported if reported is not None else autoattack_acc, missing=None),
        "autoattack_acc": format_pct(autoattack_acc, missing=None),
        "footnote": footnote,
        "unreliable": False,
    }


def write_model_card(card: Mapping[str, Any], path: str | os.PathLike) -> Path:
    atomic_write_json(path, dict(card))
    return Path(path)


# --- robustdiff-eval export ----------------------------------------------------------------------------

class ExportError(EvaluationError):
    """An export robustdiff-eval refuses: an output inside another run, a model it cannot read."""

    command = "robustdiff-eval export"


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExportRequest(ModelTarget):
    """What to export and where (robustdiff-eval export's flags); the card's fields describe *your* model."""

    out: Path  # the .pt: a plain DMWideResNet state dict
    card: Path | None = None  # also write a RobustBench model-info JSON here
    overwrite: bool = False  # replace existing out/card files
    eval_json: Path | None = None  # eval.json with the card's accuracies (default: the run directory's)
    name: str | None = None  # the card's model name (default: the run's name)
    authors: str | None = None
    link: str | None = None
    venue: str | None = None


def check_export_paths(request: ExportRequest) -> None:
    """Before any work: no silent overwrite (a ``StoreError``), no file written into another run's directory."""
    from ..data.store import check_new_file

    own = request.target.resolve() if request.target.is_dir() else request.target.resolve().parent
    for flag, path in (("--out", request.out), ("--card", request.card)):
        if path is None:
            continue
        parent = path.resolve().parent
        if (parent / "run.json").is_file() and parent != own:
            raise ExportError(f"{flag} {path} is inside another run directory ({parent}); write exports elsewhere "
                              f"— robustdiff never writes into a run it does not own")
        check_new_file(path, request.overwrite, f"robustdiff-eval export {flag}")


def export_run(request: ExportRequest) -> dict[str, Any]:
    """Export the target's model for RobustBench, checked to give the same logits, and its card when asked.

    Returns {'model': path, 'architecture', 'card' (or None), 'warnings'}; the warnings are logged too."""
    import torch

    from ..data.datasets import get_info
    from ..models.loading import CheckpointError, extract_state_dict, infer_architecture, load_wideresnet

    check_export_paths(request)
    s, _ = resolve_settings(request)
    record = (read_json(request.target / "run.json") or {}).get("model") if request.target.is_dir() else None
    if not is_wideresnet_record(record):
        return _export_other(request, s, record)
    try:
        model = load_wideresnet(s["model_path"], dataset=s["dataset"], weights=request.weights)
    except (CheckpointError, FileNotFoundError) as e:
        raise ExportError(str(e)) from None
    path = export_robustbench(model, request.out)
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
    if (unfinished := unfinished_run_warning(request.target)) is not None:
        result["warnings"].append(unfinished)
    if request.card is not None:
        card = _card(request, s, arch, result["warnings"])
        write_model_card(card, request.card)
        result["card"] = card
        log.info("wrote %s", request.card)
    for w in result["warnings"]:
        log.warning(w)
    return result


def _export_other(request: ExportRequest, s: dict[str, Any], record: Mapping[str, Any]) -> dict[str, Any]:
    """A run of another architecture (run.json ``model._target_`` is not the WideResNet): ``{'state_dict',
    'model'}`` — its weights and its model record, which `robustdiff.models.loading.load_recorded_model` rebuilds.
    RobustBench's names and cards exist for the DMWideResNet only, so ``--card`` is refused."""
    import torch

    from ..data.datasets import get_info
    from ..models.loading import CheckpointError, load_recorded_model

    name = record.get("name") or record.get("_target_")
    if request.card is not None:
        raise ExportError(f"--card: RobustBench model cards and names apply to WideResNets (DMWideResNet) only; "
                          f"{request.target} trained {name} ({record.get('_target_')}). Drop --card to export its "
                          "state dict and model config")
    try:
        model = load_recorded_model(s["model_path"], record, dataset=s["dataset"])
    except (CheckpointError, FileNotFoundError) as e:
        raise ExportError(str(e)) from None
    state_dict = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    path = Path(request.out)
    atomic_torch_save({"state_dict": state_dict, "model": dict(record), "dataset": s["dataset"]}, path)
    fresh = load_recorded_model(path, record, dataset=s["dataset"])
    probe = torch.rand((4, get_info(s["dataset"]).image_shape[2]) + get_info(s["dataset"]).image_shape[:2],
                       generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        if not torch.equal(model(probe), fresh(probe)):
            raise RuntimeError(f"{path}: the exported model does not reproduce the original logits")
    note = (f"{name} is not a WideResNet: {path} holds its state dict and model config ({{'state_dict', 'model'}}; "
            "robustdiff.models.loading.load_recorded_model rebuilds it), not a RobustBench DMWideResNet file")
    log.info("wrote %s (%s)", path, name)
    result: dict[str, Any] = {"model": str(path), "architecture": name, "card": None, "warnings": [note]}
    if (unfinished := unfinished_run_warning(request.target)) is not None:
        result["warnings"].append(unfinished)
    for w in result["warnings"]:
        log.warning(w)
    return result


def _card(request: ExportRequest, s: dict[str, Any], arch: Architecture, warnings: list[str]) -> dict[str, Any]:
    """The model card, its accuracies from eval.json; what it lacks is added to ``warnings``."""
    from ..data.datasets import get_info

    eval_path = request.eval_json or (request.target / "eval.json" if request.target.is_dir() else None)
    ev = read_json(eval_path) if eval_path is not None else None
    clean = aa = None
    if ev is None:
        warnings.append("no eval.json: the card has no accuracies; run robustdiff-eval first")
    else:
        clean = (ev.get("clean") or {}).get("acc")
        aa_res = ev.get("autoattack") or {}
        if aa_res.get("version") == "standard":
            aa = aa_res.get("robust_acc")
        elif aa_res:
            warnings.append("eval.json holds a subset of AutoAttack; the card's autoattack_acc is empty")
        info = get_info(s["dataset"])
        if ev.get("n_examples", 0) < info.n_test:
            warnings.append(f"eval.json covers {ev.get('n_examples')} of {info.n_test} test images; "
                            "RobustBench reports the full test set")
    card = model_card(dataset=s["dataset"], norm=s["norm"], eps=s["eps"], architecture=arch, clean_acc=clean,
                      autoattack_acc=aa, n_generated=s["n_generated"], name=request.name or s["name"],
                      link=request.link, authors=request.authors, venue=request.venue)
    empty = [f"--{k}" for k in ("authors", "link", "venue") if not card[k]]
    if empty:
        warnings.append(f"the card's {', '.join(k[2:] for k in empty)} are empty: pass {' '.join(empty)} "
                        "(yours, not the paper's) before submitting it to RobustBench")
    return card
