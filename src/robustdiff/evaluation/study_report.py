"""The generator-quality study's report (``robustdiff-study``): one table like the paper's robust-overfitting
table with the generators' quality beside it, and two figures — classifier FD vs robust accuracy, and test PGD
accuracy vs epoch for every arm.

Every number comes from the study directory's files (quality/*.json, runs/*/{run,summary,history,eval}.json,
sweep/*/...); nothing is typed in. Statements in the report are computed from those numbers.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..utils.formatting import format_pct
from ..utils.io import atomic_path, atomic_write_json, atomic_write_text
from .runs import load_run, read_history


def _json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def collect(out: Path, spec: Any) -> dict[str, Any]:
    """Everything the report shows, as plain data (also written to <out>/results.json)."""
    quality = {name: _json(out / "quality" / f"{name}.json") for name in spec.generators}
    floor = _json(out / "quality" / "floor.json")
    rows = []
    run_dirs = sorted((out / "runs").glob("*/run.json")) + sorted((out / "sweep").glob("*/run.json"))
    stores = {str(out / "stores" / g): g for g in spec.generators}
    for rj in run_dirs:
        run_dir = rj.parent
        run = load_run(run_dir)
        c, s = run.config, run.summary or {}
        gen = stores.get(str(c.get("generated"))) if c.get("generated") else None
        if c.get("generated") and gen is None:  # another spelling of the same path
            gen = next((g for p, g in stores.items() if Path(p).resolve() == Path(c["generated"]).resolve()), "?")
        pgd_best = s.get("test_pgd_acc_best")
        pgd_best_source = "per-epoch"
        if pgd_best is None:
            e = _json(run_dir / "pgd-best" / "eval.json")
            if e and e.get("pgd"):
                pgd_best, pgd_best_source = e["pgd"]["acc"], "robustdiff-eval"
        ev = run.evaluation or {}
        aa = ev.get("autoattack") or {}
        rows.append({
            "arm": run_dir.name if run_dir.parent.name == "runs" else f"sweep ratio {c.get('ratio'):g}",
            "dir": str(run_dir), "generator": gen, "ratio": c.get("ratio"), "seed": c.get("seed"),
            "fd": (quality.get(gen) or {}).get("value") if gen else None,
            "label_agreement": (quality.get(gen) or {}).get("label_agreement") if gen else None,
            "best_epoch": s.get("best_epoch"), "epochs": c.get("epochs"),
            "clean_best": s.get("test_clean_acc_best"), "clean_last": s.get("test_clean_acc_last"),
            "pgd_best": pgd_best, "pgd_best_source": pgd_best_source, "pgd_last": s.get("test_pgd_acc_last"),
            "aa": aa.get("robust_acc"), "aa_clean": aa.get("clean_acc"), "aa_n": aa.get("n"),
            "aa_attacks": aa.get("attacks"), "aa_targets": aa.get("targets"), "aa_seconds": aa.get("seconds"),
            "finished": bool(s.get("finished")),
            "history": [{"epoch": r.get("epoch"), "test_pgd_acc": r.get("test_pgd_acc"),
                         "val_pgd_acc": r.get("val_pgd_acc"), "test_clean_acc": r.get("test_clean_acc"),
                         "train_acc_adv": r.get("train_acc_adv")} for r in read_history(run_dir)],
        })
    for r in rows:
        gap = None if r["pgd_best"] is None or r["pgd_last"] is None else r["pgd_best"] - r["pgd_last"]
        r["pgd_gap"] = gap
    # Real data first, then by generator quality, ratio (high to low) and seed.
    rows.sort(key=lambda r: (r["generator"] is not None, r["fd"] if r["fd"] is not None else 0.0,
                             -(r["ratio"] or 0.0), r["seed"] or 0))
    timing = _json(out / "timing.json")
    return {"name": spec.name, "quality": quality, "floor": floor, "rows": rows, "timing": timing}


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def findings(data: dict[str, Any], spec: Any) -> list[str]:
    """Plain statements computed from the numbers of finished arms (no interpretation beyond arithmetic)."""
    rows = [r for r in data["rows"] if r["finished"]]
    out = []
    real = [r for r in rows if r["generator"] is None]
    quality = {g: q for g, q in data["quality"].items() if q}
    if quality:
        best = min(quality, key=lambda g: quality[g]["value"])
        order = sorted(quality, key=lambda g: quality[g]["value"])
        out.append("Generator quality (classifier FD, lower is better): " + ", ".join(
            f"{g} {quality[g]['value']:.2f} (label agreement {format_pct(quality[g].get('label_agreement'), 1)}%)"
            for g in order) + (f"; real held-out images {data['floor']['value']:.2f} "
                               f"({format_pct(data['floor'].get('label_agreement'), 1)}%)" if data.get("floor") else "")
            + ".")
        main = [r for r in rows if r["generator"] == best and r["ratio"] == spec.train.ratio]
        for key, label in (("aa", "AutoAttack"), ("pgd_best", "test PGD at the best epoch"),
                           ("clean_best", "clean accuracy at the best epoch")):
            a, b = _mean([r[key] for r in main]), _mean([r[key] for r in real])
            if a is not None and b is not None:
                verdict = "higher" if a > b else "lower" if a < b else "equal"
                out.append(f"{label}: best generator ({best}, ratio {spec.train.ratio:g}, mean of {len(main)} "
                           f"seed(s)) {format_pct(a)}% vs real data only (mean of {len(real)}) {format_pct(b)}%: "
                           f"{100 * (a - b):+.2f} points, {verdict}.")
        by_gen = []
        for g in order:
            rs = [r for r in rows if r["generator"] == g and r["ratio"] == spec.train.ratio and
                  r["seed"] == spec.train.seeds[0]]
            if rs and rs[0]["aa"] is not None:
                by_gen.append((quality[g]["value"], rs[0]["aa"], g))
        if len(by_gen) >= 2:
            pairs = list(zip(by_gen, by_gen[1:]))
            if all(a[1] > b[1] for a, b in pairs):
                verdict = "went with higher"
            elif all(a[1] == b[1] for a, b in pairs):
                verdict = "made no difference to"
            else:
                verdict = "did not go with higher"
            out.append(f"Lower FD {verdict} AutoAttack accuracy at the first seed: " +
                       ", ".join(f"{g} FD {fd:.2f} → AA {format_pct(aa)}%" for fd, aa, g in by_gen) + ".")
    if quality:
        seed0 = spec.train.seeds[0]
        sweep = sorted((r["ratio"], r) for r in rows if r["generator"] == best and r["seed"] == seed0)
        sweep += [(1.0, r) for r in rows if r["generator"] is None and r["seed"] == seed0]
        if len(sweep) >= 3:
            out.append(f"Ratio of real images per batch with {best} (seed {seed0}; 1 = real data only), AutoAttack / "
                       "test PGD at the best epoch: " + ", ".join(f"{ratio:g}: {format_pct(r['aa'])}% / {format_pct(r['pgd_best'])}%"
                                                                 for ratio, r in sweep) + ".")
    gaps = [(r["arm"], r["pgd_gap"], r["best_epoch"], r["epochs"]) for r in rows if r["pgd_gap"] is not None]
    if gaps:
        out.append("Robust overfitting (test PGD best − last epoch, points): " + ", ".join(
            f"{a} {100 * g:+.2f} (best epoch {b}/{e})" for a, g, b, e in gaps) + ".")
    return out


def figure_fd_vs_robust(data: dict[str, Any], spec: Any, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.4), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    rows = [r for r in data["rows"] if r["generator"] and r["ratio"] == spec.train.ratio and r["finished"]]
    for key, label, color, marker in (("aa", "AutoAttack", "tab:red", "o"), ("pgd_best", "test PGD (best epoch)",
                                                                             "tab:orange", "s"),
                                      ("clean_best", "clean (best epoch)", "tab:blue", "^")):
        pts = [(r["fd"], r[key], r["generator"]) for r in rows if r["fd"] is not None and r[key] is not None]
        if pts:
            ax.scatter([p[0] for p in pts], [100 * p[1] for p in pts], color=color, marker=marker, label=label)
        real = _mean([r[key] for r in data["rows"] if r["generator"] is None and r["finished"]])
        if real is not None:
            ax.axhline(100 * real, color=color, linestyle="--", linewidth=1,
                       label=f"{label}, real data only")
    for r in rows:
        if r["fd"] is not None and r["aa"] is not None:
            ax.annotate(f"{r['generator']} s{r['seed']}", (r["fd"], 100 * r["aa"]), fontsize=7,
                        xytext=(4, -10), textcoords="offset points")
    if data.get("floor"):
        ax.axvline(data["floor"]["value"], color="gray", linestyle=":", linewidth=1,
                   label="FD of held-out real images")
    ax.set_xscale("log")  # held-out real images sit orders of magnitude below weak generators
    ax.set_xlabel("classifier FD of the generated data, log scale (lower = closer to real)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{data['name']}: generator quality vs accuracy (ratio {spec.train.ratio:g})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def figure_pgd_vs_epoch(data: dict[str, Any], path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8.5, 4.8), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    colors = ["tab:gray", "tab:blue", "tab:green", "tab:red", "tab:purple", "tab:orange", "tab:brown",
              "tab:pink", "tab:olive", "tab:cyan"]
    for i, r in enumerate(data["rows"]):
        pts = [(h["epoch"], 100 * h["test_pgd_acc"]) for h in r["history"] if h.get("test_pgd_acc") is not None]
        if not pts:
            continue
        style = "--" if r["generator"] is None else "-"
        label = f"{r['arm']}" + ("" if r["generator"] is None else f" (FD {r['fd']:.1f})" if r["fd"] else "")
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", markersize=3, linewidth=1.2,
                color=colors[i % len(colors)], label=label)
        if r["best_epoch"] and r["pgd_best"] is not None:
            ax.plot([r["best_epoch"]], [100 * r["pgd_best"]], marker="*", markersize=11, linestyle="none",
                    color=colors[i % len(colors)])
    ax.set_xlabel("epoch")
    ax.set_ylabel("test PGD accuracy (%)")
    ax.set_title(f"{data['name']}: test PGD vs epoch (★ = selected epoch; dashed = real data only)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right", ncol=2)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def render(data: dict[str, Any], spec: Any, figures: dict[str, str]) -> str:
    rows = data["rows"]
    aa = spec.autoattack
    lines = [f"# Study `{data['name']}`: generator quality → robust accuracy", ""]
    lines += [f"- {f}" for f in findings(data, spec)] + [""]
    lines += ["## Generators", "",
              "| generator | EDM kimg | classifier FD | label agreement (%) | images | per-class agreement (%) |",
              "|---|---|---|---|---|---|"]
    for g, q in data["quality"].items():
        if q:
            per = " ".join(format_pct(v, 0) for v in q.get("label_agreement_per_class") or [])
            lines.append(f"| {g} | {q.get('kimg', spec.generators[g]):g} | {q['value']:.3f} | "
                         f"{format_pct(q.get('label_agreement'))} | {q['n']:,} | {per} |")
    if data.get("floor"):
        f = data["floor"]
        per = " ".join(format_pct(v, 0) for v in f.get("label_agreement_per_class") or [])
        lines.append(f"| real, held out ({f['source']}) | — | {f['value']:.3f} | {format_pct(f.get('label_agreement'))} "
                     f"| {f['n']:,} | {per} |")
    q0 = next((q for q in data["quality"].values() if q), None) or data.get("floor") or {}
    if q0:
        lines += ["", f"Classifier FD: Fréchet distance of the penultimate features of `{q0.get('classifier')}` "
                      f"({q0.get('classifier_model')}, sha256 `{str(q0.get('classifier_sha256'))[:16]}…`, clean test "
                      f"accuracy {format_pct(q0.get('classifier_test_clean_acc'))}%) against `{q0.get('reference_source')}`."
                      " FDs are comparable only within this classifier's feature space."]
    lines += ["", "## Arms (the paper's overfitting table, with generator quality)", "",
              "| arm | generator | FD | ratio | seed | best epoch | clean best | PGD best | AA best | clean last | "
              "PGD last | PGD best − last |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        gap = "—" if r["pgd_gap"] is None else f"{100 * r['pgd_gap']:+.2f}"
        fd = "—" if r["fd"] is None else f"{r['fd']:.2f}"
        lines.append(f"| {r['arm']}{'' if r['finished'] else ' (unfinished)'} | {r['generator'] or 'none'} | {fd} | "
                     f"{r['ratio']:g} | {r['seed']} | {r['best_epoch']}/{r['epochs']} | {format_pct(r['clean_best'])} | "
                     f"{format_pct(r['pgd_best'])} | {format_pct(r['aa'])} | {format_pct(r['clean_last'])} | {format_pct(r['pgd_last'])} | "
                     f"{gap} |")
    pgd_note = ""
    first = rows[0] if rows else None
    if first:
        cfg = json.loads((Path(first["dir"]) / "run.json").read_text())
        n, ev = cfg.get("norm") or {}, cfg.get("eval") or {}
        pgd_note = (f"ℓ∞ ε = {n.get('eps'):.4g}, PGD-{ev.get('steps')} ({ev.get('test_loss')} loss, step "
                    f"{n.get('step'):.4g}) on the first {spec.train.get('test_n', 1000):,} test images; best epoch = "
                    f"highest validation PGD on {cfg.get('val_size')} held-out training images.")
    targets = int(aa.get("targets") or 9)
    aa_what = ("pyautoattack" + (f", APGD-T with {targets} target classes" + ("" if targets == 9 else
                                                                                "; the standard uses 9")
                                 if "apgd-t" in aa.attacks else ""))
    lines += ["", f"Accuracies in %. {pgd_note} AA best: {' + '.join(a.upper() for a in aa.attacks)} "
                  f"({aa_what}) on the first {aa.n} test "
                  "images, the selected checkpoint (EMA), fp32. PGD best comes from the per-epoch test pass when the "
                  "best epoch had one, else from `robustdiff-eval` on the saved best model (same attack)."]
    lines += ["", "## Figures", ""] + [f"![{k}]({v})" for k, v in figures.items()]
    grids = sorted((Path(data.get("out", ".")) / "edm" / "samples").glob("grid-*.png"))
    if grids:
        lines += ["", "EDM samples (one row per seed, one column per class): " +
                  ", ".join(f"[{g.stem}](edm/samples/{g.name})" for g in grids)]
    t = data.get("timing") or {}
    if t:
        lines += ["", "Seconds per stage as recorded by robustdiff-study (stages that ran in an invocation that "
                  "stopped before recording are missing): " + ", ".join(f"{k} {v:.0f}" for k, v in t.items()) + "."]
    return "\n".join(lines) + "\n"


def write_study_report(out: str | os.PathLike, spec: Any) -> Path:
    out = Path(out)
    data = collect(out, spec)
    data["out"] = str(out)
    figures = {}
    fig_dir = out / "figures"
    if any(r["fd"] is not None for r in data["rows"]):
        figures["FD vs accuracy"] = str(figure_fd_vs_robust(data, spec, fig_dir / "fd_vs_accuracy.png")
                                        .relative_to(out))
    if any(any(h.get("test_pgd_acc") is not None for h in r["history"]) for r in data["rows"]):
        figures["test PGD vs epoch"] = str(figure_pgd_vs_epoch(data, fig_dir / "pgd_vs_epoch.png").relative_to(out))
    atomic_write_json(out / "results.json", {k: v for k, v in data.items() if k != "out"} | {
        "findings": findings(data, spec)})
    report = out / "report.md"
    atomic_write_text(report, render(data, spec, figures))
    return report


__all__ = ["collect", "findings", "write_study_report"]

