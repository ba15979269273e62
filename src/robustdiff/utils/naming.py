"""Run-directory and sweep names. Light on purpose: every CLI imports it before Hydra parses its command line.

A run's directory is named by its command-line overrides (``key:value__key:value``, Hydra's
``hydra.job.override_dirname``) so that rerunning a command resumes its run. In a sweep the keys the sweep
varies come first, and a name that is too long loses constant keys, never a swept value.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence

from omegaconf import OmegaConf

# Set by the sweep callback (cli/sweep.py) under `-m`: the sweep's name (the W&B group of its runs unless
# logger.group is given) and the keys it sweeps (they lead each job's run-directory name).
SWEEP_ENV = "ROBUSTDIFF_SWEEP"
SWEPT_ENV = "ROBUSTDIFF_SWEPT_KEYS"
ITEM_SEP, KV_SEP = "__", ":"  # conf: hydra.job.config.override_dirname
RUN_NAME_LIMIT = 120
GROUP_LIMIT = 128  # W&B's limit for a group name
_UNSAFE = re.compile(r"[^A-Za-z0-9:.+_@-]+")


def _digest(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def _safe(text: str) -> str:
    return _UNSAFE.sub("_", text).strip("._")


def override_items(override_dirname: str) -> list[str]:
    """``a:1__b:x__y`` -> ``["a:1", "b:x__y"]``: a piece without ``key:`` belongs to the value before it."""
    items: list[str] = []
    for piece in override_dirname.split(ITEM_SEP) if override_dirname else []:
        if items and KV_SEP not in piece:
            items[-1] += ITEM_SEP + piece
        else:
            items.append(piece)
    return items


def item_key(item: str) -> str:
    """The key of one ``key:value`` item, without Hydra's ``+``/``++``/``~`` prefixes."""
    return item.split(KV_SEP, 1)[0].lstrip("+~")


def swept_keys(environ: os._Environ | dict[str, str] = os.environ) -> list[str]:
    """The keys the running sweep varies (empty outside a sweep)."""
    try:
        return list(json.loads(environ.get(SWEPT_ENV) or "[]"))
    except ValueError:
        return []


def fit_items(items: Sequence[str], swept: Sequence[str], limit: int, safe: bool = True) -> str:
    """Join ``items`` with the swept keys first; past ``limit`` characters drop constant items from the end
    (then a hash of the full name keeps it unique) before any swept one is cut."""
    clean = [_safe(i) if safe else i for i in items]
    first = [c for i, c in zip(items, clean) if item_key(i) in swept]
    rest = [c for i, c in zip(items, clean) if item_key(i) not in swept]
    full = ITEM_SEP.join(first + rest)
    if len(full) <= limit:
        return full
    tag = f"-{_digest(full)}"
    while rest and len(ITEM_SEP.join(first + rest)) + len(tag) > limit:
        rest.pop()
    kept = ITEM_SEP.join(first + rest)
    if len(kept) + len(tag) > limit:  # the swept values alone are too long: cut them (rare)
        kept = kept[: limit - len(tag)]
    return kept + tag


def run_name(name: str | None, override_dirname: str = "", swept: Sequence[str] | None = None) -> str:
    """Deterministic run-directory name: the given name, else the overrides, else 'default'.

    Overrides are joined as ``key:value__key:value`` (conf: hydra.job.config.override_dirname): no '='
    or ',', so the directory can itself be passed back as a Hydra override value (generated=..., network=...).
    ``swept`` (default: the running sweep's keys) come first; see ``fit_items`` for names over 120 characters.
    """
    swept = swept_keys() if swept is None else list(swept)
    if name in (None, "", "None", "null") and override_dirname and swept:
        return fit_items(override_items(override_dirname), swept, RUN_NAME_LIMIT)
    raw = name if name not in (None, "", "None", "null") else (override_dirname or "default")
    safe = _safe(str(raw)) or "default"
    if len(safe) > RUN_NAME_LIMIT:  # single runs keep this cut: it names directories that already exist
        safe = f"{safe[:100]}-{_digest(safe)}"
    return safe


def sweep_name(override_dirname: str, swept: Sequence[str]) -> str:
    """The sweep's overrides (``ratio:0.5,0.7__epochs:3``, swept keys first) as a W&B group name."""
    return fit_items(override_items(override_dirname), swept, GROUP_LIMIT, safe=False) or "default"


def sweep_dir_name(environ: os._Environ | dict[str, str] = os.environ) -> str:
    """The running sweep's folder under ``<run_root>/sweeps/``."""
    return run_name(environ.get(SWEEP_ENV) or "default", swept=[])


def job_dir(run_root: str, name: str | None, override_dirname: str) -> str:
    """A sweep job's run directory: ``<run_root>/<run name>`` like a single run's (absolute, so that it does
    not depend on hydra.sweep.dir, the sweep's own folder)."""
    return os.path.join(os.path.abspath(run_root), run_name(name, override_dirname))


def register_resolvers() -> None:
    OmegaConf.register_new_resolver("rd_run_name", lambda name, overrides="": run_name(name, overrides), replace=True)
    OmegaConf.register_new_resolver("rd_sweep_dir", lambda: sweep_dir_name(), replace=True)
    OmegaConf.register_new_resolver("rd_job_dir", job_dir, replace=True)


register_resolvers()
