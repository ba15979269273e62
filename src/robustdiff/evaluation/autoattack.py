"""AutoAttack robust accuracy through ``pyautoattack`` (standard version: APGD-CE, APGD-T, FAB-T, Square),
resumable: an interrupted run continues at its last finished batch.

Takes images ``x: (N, C, H, W)`` float in [0, 1] and labels ``y: (N,)`` int64, like ``robustness``; the model
normalises internally and is evaluated in eval mode and fp32 (``robustness.evaluation_mode``).

We drive pyautoattack one (attack, batch) at a time and keep our own resume state. Why not its
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
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..utils.io import atomic_write_json
from .results import format_eps
from .robustness import check_eps, evaluation_mode, on_model_device

log = logging.getLogger(__name__)

STANDARD_ATTACKS: tuple[str, ...] = ("apgd-ce", "apgd-t", "fab-t", "square")
AA_NORMS = {"linf": "Linf", "l2": "L2"}
STATE_FORMAT = 1

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
    x, y = on_model_device(model, x, y)
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
