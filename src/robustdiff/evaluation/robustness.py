"""Clean accuracy, PGD and AutoAttack robust accuracy, the results files, and the paper's numbers.

Every function takes images ``x: (N, C, H, W)`` float in [0, 1] and labels ``y: (N,)`` int64; the
model normalises internally. Models are evaluated in eval mode and fp32 (``evaluation_mode``).

AutoAttack runs through ``pyautoattack`` (standard version: APGD-CE, APGD-T, FAB-T, Square), but
we drive it one (attack, batch) at a time and keep our own resume state. Why not its
``state_path``: in pyautoattack 0.2.0 a resumed run always fails — the saved attack set is written
as the string ``"{'apgd-ce', ...}"`` and compared with a set on load (ValueError), and a resumed
run with robust flags would reference ``y_adv`` before assigning it. Every pyautoattack attack
re-seeds the global RNG at each ``perturb`` call, so attacking the still-robust points batch by
batch, in the same batches it would use itself, gives exactly the result of one direct call
(``tests/test_evaluation.py`` checks this) and lets an interrupted run resume at the last finished
batch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..adversarial.attacks import NORMS, accuracy_counts, parse_fraction, pgd_attack
from ..utils.io import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

STANDARD_ATTACKS: tuple[str, ...] = ("apgd-ce", "apgd-t", "fab-t", "square")
AA_NORMS = {"linf": "Linf", "l2": "L2"}
STATE_FORMAT = 1


# --- ε handling --------------------------------------------------------------------------------------

class EpsilonError(ValueError):
    pass


# Beyond these an ε can't be meant for [0, 1] images: ℓ∞ is at most 1, and an ℓ2 radius of 16 already
# exceeds the distance between most pairs of 32×32 images. Pixel-unit ε (8 for ℓ∞, 128 for ℓ2) is caught.
_EPS_LIMIT = {"linf": 1.0, "l2": 16.0}


def check_eps(norm: str, eps: float) -> float:
    """Validate an ε meant for images in [0, 1]; an ε in pixel units gets an error that gives the fix."""
    if norm not in NORMS:
        raise EpsilonError(f"norm must be one of {NORMS}, got {norm!r}")
    eps = float(eps)
    if not eps > 0 or not math.isfinite(eps):
        raise EpsilonError(f"eps must be a positive number, got {eps}")
    if eps > _EPS_LIMIT[norm]:
        raise EpsilonError(f"eps={eps:g} is too large for {norm} on images in [0, 1]; it looks like pixel units. "
                           f"Use {eps:g}/255 = {eps / 255:.6f} (e.g. --eps {eps:g}/255)")
    return eps


def parse_eps(text: str | float, norm: str) -> float:
    """'8/255', '0.0313725' or a float -> ε for images in [0, 1] (checked by ``check_eps``)."""
    try:
        value = parse_fraction(text)
    except ValueError as e:
        raise EpsilonError(f"cannot read eps {text!r}: write it as a number or a fraction like 8/255") from e
    return check_eps(norm, value)


def format_eps(eps: float) -> str:
    """8/255 -> '8/255'; anything not a multiple of 1/255 as a plain number."""
    k = eps * 255
    if abs(k - round(k)) < 1e-6:
        return f"{round(k)}/255"
    return f"{eps:g}"


# --- model state -------------------------------------------------------------------------------------

@contextlib.contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode (restored afterwards), autocast off, and a check that the weights are fp32."""
    bad = sorted({str(p.dtype) for p in model.parameters() if p.is_floating_point() and p.dtype != torch.float32})
    if bad:
        raise TypeError(f"evaluation runs in fp32 but the model has {', '.join(bad)} parameters; call model.float()")
    was_training = model.training
    model.eval()
    device_type = next(model.parameters()).device.type
    try:
        with torch.autocast(device_type=device_type, enabled=False):
            yield model
    finally:
        model.train(was_training)


def _on_model_device(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    device = next(model.parameters()).device
    if x.dim() != 4:
        raise ValueError(f"x must be (N, C, H, W), got shape {tuple(x.shape)}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x has {x.shape[0]} images but y has {y.shape[0]} labels")
    return x.to(device=device, dtype=torch.float32), y.to(device=device, dtype=torch.long)


def evaluate_clean(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 500) -> dict[str, Any]:
    """Clean accuracy. Returns {'acc' in [0, 1], 'n_correct', 'n'}."""
    x, y = _on_model_device(model, x, y)
    with evaluation_mode(model):
        n_correct = int(accuracy_counts(model, x, y, batch_size))
    return {"acc": n_correct / len(y), "n_correct": n_correct, "n": len(y)}


def evaluate_pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    norm: str = "linf",
    eps: float = 8 / 255,
    step: float | None = None,
    steps: int = 40,
    loss: str = "ce",
    batch_size: int = 500,
    seed: int = 0,
) -> dict[str, Any]:
    """PGD-``steps`` robust accuracy with a random start; ``step`` defaults to ε/4 (2/255 at ε = 8/255).

    Returns {'acc', 'n_correct', 'n', 'norm', 'eps', 'step', 'steps', 'loss', 'seed'}.
    """
    eps = check_eps(norm, eps)
    step = eps / 4 if step is None else float(step)
    x, y = _on_model_device(model, x, y)
    generator = torch.Generator(device=x.device).manual_seed(seed)

    def attack(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return pgd_attack(model, xb, yb, norm=norm, eps=eps, step=step, steps=steps, loss=loss, generator=generator)

    with evaluation_mode(model):
        n_correct = int(accuracy_counts(model, x, y, batch_size, attack=attack))
    return {"acc": n_correct / len(y), "n_correct": n_correct, "n": len(y), "norm": norm, "eps": eps,
            "step": step, "steps": steps, "loss": loss, "seed": seed}


# --- AutoAttack --------------------------------------------------------------------------------------

# pyautoattack's own sanity checks (checks.py) log these; we keep them as named flags.
_AA_FLAGS = {
    "randomized defense": "randomized",
    "probability distribution": "probability_output",
    "dynamic defense": "dynamic",
    "zero gradient": "zero_gradients",
    "Square Attack has decreased": "square_decreased",
    "target classes": "too_few_classes",
    "not possible to use": "too_few_classes",
}


def _flag_of(message: str) -> str:
    for needle, flag in _AA_FLAGS.items():
        if needle in message:
            return flag
    return "other"


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def _capture_autoattack_warnings(sink: list[str]) -> Iterator[logging.Logger]:
    """Collect what pyautoattack reports through its 'auto-attack' logger and through warnings.warn."""
    aa_logger = logging.getLogger("auto-attack")
    handler = _Collect()
    aa_logger.addHandler(handler)
    propagate, aa_logger.propagate = aa_logger.propagate, False  # we report them ourselves, once each
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield aa_logger
    finally:
        aa_logger.removeHandler(handler)
        aa_logger.propagate = propagate
    for message in handler.messages + [str(w.message) for w in caught]:
        if message not in sink:
            sink.append(message)


@contextlib.contextmanager
def _keep_trace() -> Iterator[None]:
    """pyautoattack's dynamic-defence check ends with sys.settrace(None), which would switch off a running
    coverage tool or debugger; put the previous trace function back."""
    previous = sys.gettrace()
    try:
        yield
    finally:
        if sys.gettrace() is not previous:
            sys.settrace(previous)


def _bits(flags: torch.Tensor) -> str:
    return "".join("1" if v else "0" for v in flags.tolist())


def _unbits(text: str) -> torch.Tensor:
    return torch.tensor([c == "1" for c in text], dtype=torch.bool)


def _sha256_tensors(tensors: Sequence[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _fingerprint(model: nn.Module, x: torch.Tensor, y: torch.Tensor, settings: dict[str, Any]) -> dict[str, Any]:
    # Values only, not names: a wrapped model with the same weights is the same model.
    weights = [t for t in model.state_dict().values()]
    return {**settings, "n": len(y), "data_sha256": _sha256_tensors([x, y]), "model_sha256": _sha256_tensors(weights)}


class StateMismatchError(ValueError):
    pass


def _load_state(path: Path, fingerprint: dict[str, Any]) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        state = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise StateMismatchError(f"AutoAttack state {path}: not valid JSON ({e}); delete it to start over") from e
    if state.get("format") != STATE_FORMAT:
        raise StateMismatchError(f"AutoAttack state {path}: format {state.get('format')!r}, expected {STATE_FORMAT}; "
                                 "delete it to start over")
    saved = state.get("fingerprint", {})
    for key, value in fingerprint.items():
        if saved.get(key) != value:
            raise StateMismatchError(
                f"AutoAttack state {path}: field {key!r} is {saved.get(key)!r} in the state but {value!r} for this "
                "run (different model, points or settings). Delete the state file or choose another state path")
    return state


def evaluate_autoattack(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    norm: str = "linf",
    eps: float = 8 / 255,
    batch_size: int = 128,
    seed: int = 0,
    state_path: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    attacks: Sequence[str] | None = None,
    targets: int | None = None,
) -> dict[str, Any]:
    """AutoAttack (standard version) robust accuracy through pyautoattack.

    x: (N, C, H, W) in [0, 1], y: (N,). ``attacks`` restricts the run to a subset of
    ``STANDARD_ATTACKS`` (kept in the standard order, with the standard settings) — for quick looks;
    only the full set is "AutoAttack". ``targets`` changes the number of target classes of APGD-T and FAB-T
    (standard: 9) — a cheaper, weaker attack for CPU studies, recorded in the result. ``state_path`` (a JSON file, or an existing directory in
    which the file is named by a hash of model, points and settings) is written after every batch;
    a later call with the same model, points and settings resumes from it, a different one is
    refused. The global RNG state is restored on return.

    Returns {'clean_acc', 'robust_acc', 'n', 'n_clean', 'n_robust', 'per_attack' (robust accuracy
    after each attack, cumulative), 'norm', 'eps', 'seed', 'batch_size', 'version', 'attacks',
    'warnings' (pyautoattack's own messages), 'flags' (their names), 'seconds', 'attack_seconds',
    'resumed', 'state_path', 'robust_points' ('1'/'0' per point, in order)}.
    """
    from pyautoattack import AutoAttack
    from pyautoattack import __version__ as aa_version
    from pyautoattack import checks as aa_checks

    eps = check_eps(norm, eps)
    attacks = list(STANDARD_ATTACKS) if attacks is None else list(attacks)
    unknown = [a for a in attacks if a not in STANDARD_ATTACKS]
    if unknown or not attacks:
        raise ValueError(f"attacks must be a non-empty subset of {STANDARD_ATTACKS}, got {attacks}")
    attacks = [a for a in STANDARD_ATTACKS if a in attacks]
    if device is not None:
        model.to(device)
    x, y = _on_model_device(model, x, y)
    device = x.device
    n = len(y)
    if targets is not None and not 1 <= int(targets) <= 9:
        raise ValueError(f"targets={targets}: APGD-T/FAB-T target classes must be in 1..9 (standard: 9)")
    settings = {"norm": norm, "eps": eps, "seed": seed, "batch_size": batch_size, "attacks": attacks,
                "pyautoattack": aa_version}
    if targets is not None and int(targets) != 9:
        settings["targets"] = int(targets)
    state_path = Path(state_path) if state_path is not None else None
    fingerprint = _fingerprint(model, x, y, settings) if state_path is not None else None
    if state_path is not None and state_path.is_dir():
        # One state file per (model, points, settings): a changed model or setting starts afresh.
        key = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]
        state_path = state_path / f"autoattack-{key}.json"
    state = _load_state(state_path, fingerprint) if state_path is not None else None
    resumed = state is not None
    if state is None:
        state = {"format": STATE_FORMAT, "fingerprint": fingerprint, "clean": None, "robust": None,
                 "attack": None, "attack_start": None, "batches_done": 0, "per_attack": {}, "warnings": [],
                 "seconds": 0.0, "attack_seconds": {}}
    else:
        log.info("AutoAttack: resuming from %s (%s)", state_path,
                 f"{state['attack']}, {state['batches_done']} batches done" if state["attack"] else "clean pass done")
    state.setdefault("attack_seconds", {})
    messages: list[str] = list(state["warnings"])
    started = time.time()
    seconds_before = float(state["seconds"])

    def save() -> None:
        if state_path is not None:
            state["warnings"] = messages
            state["seconds"] = seconds_before + time.time() - started
            atomic_write_json(state_path, state)

    cuda_devices = [device] if device.type == "cuda" else []
    with evaluation_mode(model), torch.random.fork_rng(devices=cuda_devices), \
            _capture_autoattack_warnings(messages) as aa_logger:
        adversary = AutoAttack(model, norm=AA_NORMS[norm], eps=eps, version="standard", device=device, seed=seed)
        adversary.verbose = False  # its progress lines are debug records; we log our own
        if "targets" in settings:
            adversary.apgd_targeted.n_target_classes = adversary.fab.n_target_classes = settings["targets"]
        if state["clean"] is None:
            # Clean pass in the batches pyautoattack itself would use, so predictions match a direct call.
            with torch.no_grad():
                clean = torch.cat([model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]
                                   for i in range(0, n, batch_size)]).cpu()
            state["clean"], state["robust"] = _bits(clean), _bits(clean)
            save()
        clean = _unbits(state["clean"])
        robust = _unbits(state["robust"])
        log.info("AutoAttack %s eps=%s on %d points: clean %.2f%%", norm, format_eps(eps), n, 100 * clean.float().mean())
        for attack in attacks:
            if attack in state["per_attack"]:
                continue
            if state["attack"] != attack:
                # The batches of an attack are fixed by the points robust when it starts.
                state["attack"], state["attack_start"], state["batches_done"] = attack, state["robust"], 0
            todo = torch.nonzero(_unbits(state["attack_start"])).flatten()
            n_batches = math.ceil(len(todo) / batch_size)
            adversary.attacks_to_run = [attack]
            for b in range(state["batches_done"], n_batches):
                batch_started = time.time()
                idx = todo[b * batch_size : (b + 1) * batch_size]
                ib = idx.to(device)
                # With every point of the batch still robust, its clean pass inside is a no-op and the attack
                # sees exactly the batch the full run would give it.
                with _keep_trace():
                    _, y_adv = adversary.run_standard_evaluation(x[ib], y[ib], batch_size=batch_size)
                robust[idx] &= (y_adv == y[ib]).cpu()
                state["robust"], state["batches_done"] = _bits(robust), b + 1
                seconds = state["attack_seconds"]
                seconds[attack] = seconds.get(attack, 0.0) + time.time() - batch_started
                save()
                log.info("AutoAttack %s: batch %d/%d, robust %.2f%% so far (%.0f s)", attack, b + 1, n_batches,
                         100 * robust.float().mean(), seconds_before + time.time() - started)
            state["per_attack"][attack] = robust.float().mean().item()
            save()
        per_attack = {"clean": clean.float().mean().item(), **state["per_attack"]}
        # Run in pieces, pyautoattack never sees all attacks together; apply its Square check to the whole.
        aa_checks.check_square_sr(per_attack, logger=aa_logger)
    save()
    flags = sorted({_flag_of(m) for m in messages})
    for m in messages:
        log.warning("AutoAttack flagged: %s", m)
    return {
        "clean_acc": clean.float().mean().item(),
        "robust_acc": robust.float().mean().item(),
        "n": n,
        "n_clean": int(clean.sum()),
        "n_robust": int(robust.sum()),
        "per_attack": per_attack,
        "norm": norm,
        "eps": eps,
        "seed": seed,
        "batch_size": batch_size,
        "version": "standard" if attacks == list(STANDARD_ATTACKS) and "targets" not in settings
        else "standard-subset",
        "attacks": attacks,
        "targets": settings.get("targets", 9),
        "pyautoattack": aa_version,
        "warnings": messages,
        "flags": flags,
        "seconds": seconds_before + time.time() - started,
        "attack_seconds": dict(state["attack_seconds"]),
        "resumed": resumed,
        "state_path": str(state_path) if state_path is not None else None,
        "robust_points": _bits(robust),
    }


# --- sanity ------------------------------------------------------------------------------------------

def clean_accuracy_warning(measured: float, expected: float | None, n: int, num_classes: int,
                           what: str = "model") -> str | None:
    """A warning when clean accuracy is far below the recorded/reported value, or near chance.

    "Far" means more than max(5 points, 3 binomial standard errors on n points) below.
    """
    likely = ("likely causes: the mean/std normalisation applied twice or the wrong mean/std (the model "
              "normalises inside; feed it images in [0, 1]), wrong or partially loaded weights (EMA vs live, "
              "key prefixes), or the wrong dataset")
    if expected is not None:
        tolerance = max(0.05, 3 * math.sqrt(max(expected * (1 - expected), 1e-4) / max(n, 1)))
        if measured < expected - tolerance:
            return (f"{what}: clean accuracy {100 * measured:.2f}% on {n} points is far below the recorded "
                    f"{100 * expected:.2f}%; {likely}")
    if measured <= 1.5 / num_classes:
        return f"{what}: clean accuracy {100 * measured:.2f}% is near chance ({100 / num_classes:.1f}%); {likely}"
    return None


# --- the paper's numbers -----------------------------------------------------------------------------

@dataclass(frozen=True)
class PaperResult:
    """One released model or reported setting of Wang et al. (2023); accuracies in %."""

    dataset: str
    norm: str
    eps: float
    model: str  # wrn-{depth}-{width}
    n_generated: int
    ratio: float | None
    batch_size: int | None
    epochs: int | None
    clean: float | None
    autoattack: float | None
    released: bool = True  # a released checkpoint; False: a number from the paper's studies
    note: str = ""


_M = 1_000_000
PAPER_RESULTS: tuple[PaperResult, ...] = (
    PaperResult("cifar10", "linf", 8 / 255, "wrn-28-10", 1 * _M, 0.3, 512, 400, 91.12, 63.35),
    PaperResult("cifar10", "linf", 8 / 255, "wrn-28-10", 20 * _M, 0.2, 2048, 2400, 92.44, 67.31),
    PaperResult("cifar10", "linf", 8 / 255, "wrn-70-16", 50 * _M, 0.2, 1024, 2000, 93.25, 70.69,
                note="batch and epochs recalled, not read from a source"),
    PaperResult("cifar10", "l2", 128 / 255, "wrn-28-10", 50 * _M, 0.2, None, None, 95.16, 83.63),
    PaperResult("cifar10", "l2", 128 / 255, "wrn-70-16", 50 * _M, 0.2, None, None, 95.54, 84.86),
    PaperResult("cifar100", "linf", 8 / 255, "wrn-28-10", 1 * _M, 0.3, 512, 400, 68.06, 35.65),
    PaperResult("cifar100", "linf", 8 / 255, "wrn-28-10", 50 * _M, 0.2, None, None, 72.58, 38.83),
    PaperResult("cifar100", "linf", 8 / 255, "wrn-70-16", 50 * _M, 0.2, None, None, 75.22, 42.67),
    PaperResult("svhn", "linf", 8 / 255, "wrn-28-10", 1 * _M, 0.2, 1024, 800, 95.19, 61.85),
    PaperResult("svhn", "linf", 8 / 255, "wrn-28-10", 50 * _M, 0.2, 2048, 1600, 95.56, 64.01),
    PaperResult("tinyimagenet", "linf", 8 / 255, "wrn-28-10", 1 * _M, 0.4, 512, 400, 53.62, 23.40),
    PaperResult("tinyimagenet", "linf", 8 / 255, "wrn-28-10", 1 * _M, 0.2, 512, 400, 65.19, 31.30,
                note="generated by an ImageNet-64 EDM"),
    # Robust-overfitting study (CIFAR-10 ℓ∞, WRN-28-10): AutoAttack of the best-epoch checkpoint.
    PaperResult("cifar10", "linf", 8 / 255, "wrn-28-10", 0, 1.0, None, 400, None, 54.57, released=False,
                note="no generated data; last epoch 44.89"),
    PaperResult("cifar10", "linf", 8 / 255, "wrn-28-10", 20 * _M, 0.2, None, 400, None, 63.84, released=False,
                note="robust-overfitting study"),
)


def paper_result(dataset: str, norm: str, model: str, n_generated: int, epochs: int | None = None,
                 eps: float | None = None) -> PaperResult | None:
    """The paper's row for this setting, or None. With several rows, the one for ``epochs``, else the released one."""
    rows = [r for r in PAPER_RESULTS if r.dataset == dataset and r.norm == norm and r.model == model
            and r.n_generated == n_generated and (eps is None or abs(r.eps - eps) < 1e-6)]
    if not rows:
        return None
    if epochs is not None:
        for r in rows:
            if r.epochs == epochs:
                return r
    return next((r for r in rows if r.released), rows[0])


def format_count(n: int | None) -> str:
    """1000000 -> '1M', 20000000 -> '20M', 50000 -> '50K'."""
    if not n:
        return "0"
    for unit, size in (("M", _M), ("K", 1000)):
        if n >= size:
            value = Fraction(n, size)
            return f"{float(value):g}{unit}"
    return str(n)


# --- results files -----------------------------------------------------------------------------------

def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.2f}"


def render_eval_markdown(results: dict[str, Any]) -> str:
    """The eval.json content as a markdown table, with the paper's row beside ours when there is one."""
    s = results["settings"]
    lines = [f"# Evaluation: {s.get('name') or s.get('model_path')}", ""]
    lines.append(f"{s['dataset']}, {s['norm']} ε = {format_eps(s['eps'])}, {s['model']}, "
                 f"{format_count(s.get('n_generated'))} generated, {results['n_examples']} test points, "
                 f"seed {s['seed']}.")
    clean = results.get("clean")
    pgd = results.get("pgd")
    pgd_name = f"PGD-{s['pgd_steps']} {s.get('pgd_loss', '')}".strip() if s.get("pgd_steps") else "PGD"
    lines += ["", f"| | clean (%) | {pgd_name} (%) | AutoAttack (%) | points |", "|---|---|---|---|---|"]
    aa = results.get("autoattack")
    aa_name = "AutoAttack" if not aa or aa["version"] == "standard" else f"AutoAttack ({'+'.join(aa['attacks'])})"
    lines[-2] = lines[-2].replace("AutoAttack", aa_name, 1)
    lines.append(f"| robustdiff | {_pct(clean and clean['acc'])} | {_pct(pgd and pgd['acc'])} | "
                 f"{_pct(aa and aa['robust_acc'])} | {results['n_examples']} |")
    paper = results.get("paper")
    if paper:
        clean_p = "—" if paper["clean"] is None else f"{paper['clean']:.2f}"
        aa_p = "—" if paper["autoattack"] is None else f"{paper['autoattack']:.2f}"
        note = f" ({paper['note']})" if paper.get("note") else ""
        lines.append(f"| paper{note} | {clean_p} | — | {aa_p} | 10000 |")
    else:
        lines += ["", "The paper reports no number for this setting."]
    if aa:
        lines += ["", "AutoAttack, robust accuracy after each attack: "
                  + ", ".join(f"{k} {100 * v:.2f}%" for k, v in aa["per_attack"].items()) + "."]
    if results.get("warnings"):
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in results["warnings"]]
    return "\n".join(lines) + "\n"


def write_eval_results(out_dir: str | os.PathLike, results: dict[str, Any]) -> tuple[Path, Path, Path]:
    """Write ``eval.json`` and ``eval.md`` (the latest evaluation) into ``out_dir``, and keep this evaluation as
    ``evals/<n>-<created>.json`` beside every earlier one, so an evaluation with other settings never loses a result.
    Every write is atomic. Returns (eval.json, eval.md, the kept copy)."""
    out_dir = Path(out_dir)
    json_path, md_path = out_dir / "eval.json", out_dir / "eval.md"
    history = out_dir / "evals"
    history.mkdir(exist_ok=True)
    stamp = str(results.get("created") or "undated").replace("-", "").replace(":", "").replace("+0000", "Z")
    index = 1 + max((int(f.name.split("-", 1)[0]) for f in history.glob("*.json")
                     if f.name.split("-", 1)[0].isdigit()), default=0)
    kept = history / f"{index:04d}-{stamp}.json"  # numbered: sorted by name is the order they ran in
    atomic_write_json(kept, results)
    atomic_write_json(json_path, results)
    atomic_write_text(md_path, render_eval_markdown(results))
    return json_path, md_path, kept


def paper_result_dict(row: PaperResult | None) -> dict[str, Any] | None:
    return None if row is None else asdict(row)
