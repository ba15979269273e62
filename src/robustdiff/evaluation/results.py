"""An evaluation's results files: ``eval.json`` and ``eval.md`` in the output directory, every earlier evaluation
kept under ``evals/``, whether a run already has a given evaluation, and the formatting the tables share (ε as
``8/255``, counts as ``20M``, accuracies in %).

Imports no torch: the report and the plots use the same formatting.
"""

from __future__ import annotations

import json
import os
from fractions import Fraction
from pathlib import Path
from typing import Any

from ..utils.formatting import format_pct
from ..utils.io import atomic_write_json, atomic_write_text


def format_eps(eps: float) -> str:
    """8/255 -> '8/255'; anything not a multiple of 1/255 as a plain number."""
    k = eps * 255
    if abs(k - round(k)) < 1e-6:
        return f"{round(k)}/255"
    return f"{eps:g}"


def format_count(n: int | None) -> str:
    """1000000 -> '1M', 20000000 -> '20M', 50000 -> '50K'."""
    if not n:
        return "0"
    for unit, size in (("M", 1_000_000), ("K", 1000)):
        if n >= size:
            value = Fraction(n, size)
            return f"{float(value):g}{unit}"
    return str(n)


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
    lines.append(f"| robustdiff | {format_pct(clean and clean['acc'])} | {format_pct(pgd and pgd['acc'])} | "
                 f"{format_pct(aa and aa['robust_acc'])} | {results['n_examples']} |")
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
        if pgd and aa["version"] != "standard" and aa["robust_acc"] > pgd["acc"]:
            lines += ["", f"This AutoAttack subset ({'+'.join(aa['attacks'])}) is weaker here than {pgd_name}: "
                      "the model's robust accuracy is at most the lower number. Standard AutoAttack (all four "
                      "attacks) is the figure to report."]
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


def has_evaluation(run_dir: str | os.PathLike, n: int, attacks: str | None) -> bool:
    """Whether ``run_dir/eval.json`` already holds AutoAttack on the first ``n`` test images with ``attacks``
    (comma-separated; None or "standard": any), written after the run's model.pt."""
    run_dir = Path(run_dir)
    path = run_dir / "eval.json"
    if not path.is_file():
        return False
    e = json.loads(path.read_text())
    aa = e.get("autoattack") or {}
    trained = (run_dir / "model.pt").stat().st_mtime if (run_dir / "model.pt").is_file() else 0
    wanted = sorted(attacks.split(",")) if attacks and attacks != "standard" else None
    return (e.get("n_examples") == n and aa.get("robust_acc") is not None and path.stat().st_mtime >= trained
            and (wanted is None or sorted(aa.get("attacks") or []) == wanted))
