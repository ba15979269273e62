"""The report of a study that lists its stores and arms: results.json, report.md and three figures.

Every number is read from the study directory; the statements are arithmetic on them, each difference set
against the standard error its sample sizes give (binomial, sqrt(p(1 − p) / n)) and the spread of the seeds.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from ..utils.formatting import format_pct
from ..utils.io import atomic_path, atomic_write_json, atomic_write_text
from .runs import load_run, read_history


def _json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def _se(p: float | None, n: int | None) -> float | None:
    return None if p is None or not n else math.sqrt(max(p * (1 - p), 0.0) / n)


def collect(out: Path, spec: Any) -> dict[str, Any]:
    quality = {name: _json(out / "quality" / f"{name}.json") for name in spec.stores}
    rows = []
    for name, arm in spec.arms.items():
        run_dir = out / "runs" / name
        if not (run_dir / "run.json").is_file():
            rows.append({"arm": name, "store": arm.get("store"), "seed": arm.seed, "finished": False, "history": []})
            continue
        run = load_run(run_dir)
        c, s = run.config, run.summary or {}
        pgd_best = s.get("test_pgd_acc_best")
        if pgd_best is None:
            e = _json(run_dir / "pgd-best" / "eval.json")
            pgd_best = e["pgd"]["acc"] if e and e.get("pgd") else None
        aa = (run.evaluation or {}).get("autoattack") or {}
        q = quality.get(arm.get("store")) or {} if arm.get("store") else {}
        rows.append({
            "arm": name, "store": arm.get("store"), "generator": q.get("generator"), "kimg": q.get("kimg"),
            "fd": q.get("value"), "label_agreement": q.get("label_agreement"),
            "keep_fraction": q.get("keep_fraction"), "n_generated": q.get("n_images"),
            "ratio": c.get("ratio"), "seed": c.get("seed"), "epochs": c.get("epochs"),
            "best_epoch": s.get("best_epoch"), "clean_best": s.get("test_clean_acc_best"),
            "clean_last": s.get("test_clean_acc_last"), "pgd_best": pgd_best, "pgd_last": s.get("test_pgd_acc_last"),
            "aa": aa.get("robust_acc"), "aa_n": aa.get("n"), "finished": bool(s.get("finished")),
            "history": [{"epoch": r.get("epoch"), "test_pgd_acc": r.get("test_pgd_acc"),
                         "train_acc_adv": r.get("train_acc_adv")} for r in read_history(run_dir)],
        })
    for r in rows:
        r["pgd_gap"] = (r["pgd_best"] - r["pgd_last"]) if r.get("pgd_best") is not None and \
            r.get("pgd_last") is not None else None
    return {"name": spec.name, "quality": quality, "floor": _json(out / "quality" / "floor.json"), "rows": rows,
            "timing": _json(out / "timing.json"), "test_n": int(spec.train.get("test_n", 1000)),
            "aa_n": int(spec.autoattack.n)}


def _group(rows: list[dict], key: str) -> tuple[float | None, float | None, int]:
    vals = [r[key] for r in rows if r.get(key) is not None]
    if not vals:
        return None, None, 0
    return sum(vals) / len(vals), (max(vals) - min(vals)) if len(vals) > 1 else None, len(vals)


def compare(a_rows: list[dict], b_rows: list[dict], key: str, n: int) -> dict[str, Any] | None:
    """Mean of ``key`` over arms a minus over arms b, with the standard error of that difference (binomial on
    ``n`` images per measurement, over the seeds) and the larger seed range; "resolved" when the difference
    exceeds twice the standard error and the larger range."""
    (ma, ra, na), (mb, rb, nb) = _group(a_rows, key), _group(b_rows, key)
    if ma is None or mb is None:
        return None
    se = math.sqrt(_se(ma, n) ** 2 / na + _se(mb, n) ** 2 / nb)
    spread = max(ra or 0.0, rb or 0.0)
    diff = ma - mb
    return {"a": ma, "b": mb, "n_a": na, "n_b": nb, "diff": diff, "se": se, "spread": spread,
            "resolved": abs(diff) > max(2 * se, spread)}


def _versus(first: str, second: str, c: dict[str, Any]) -> str:
    """One comparison of `compare` as a sentence: the two sides, their means, the difference against its
    standard error and the seeds' range, and the verdict."""
    verdict = ("higher" if c["diff"] > 0 else "lower") if c["resolved"] else "not resolved"
    return (f"{first} vs {second}: {format_pct(c['a'])}% vs {format_pct(c['b'])}%, {100 * c['diff']:+.2f} points "
            f"(standard error {100 * c['se']:.2f}, seed range {100 * c['spread']:.2f}): {verdict}.")


def same_generator_pairs(data: dict[str, Any], stores: list[str]) -> list[tuple[str, str]]:
    """Pairs of stores drawn from one generator (more images vs fewer, selected vs raw), in the study's order:
    the comparisons that hold the generator fixed and change only the amount or the selection."""
    names = [s for s in data["quality"] if s in stores]
    gen = {s: (data["quality"][s] or {}).get("generator") for s in names}
    return [(a, b) for i, a in enumerate(names) for b in names[i + 1:] if gen[a] and gen[a] == gen[b]]


def best_generator(data: dict[str, Any]) -> str | None:
    """The generator whose unselected store has the lowest classifier FD (the study's "best")."""
    raw = [q for q in data["quality"].values() if q and (q.get("keep_fraction") or 1) == 1]
    return min(raw, key=lambda q: q["value"])["generator"] if raw else None


def findings(data: dict[str, Any], spec: Any) -> list[str]:
    rows = [r for r in data["rows"] if r["finished"]]
    real = [r for r in rows if r["store"] is None]
    out = []
    q = {k: v for k, v in data["quality"].items() if v}
    if q:
        out.append("Stores (classifier FD, label agreement): " + ", ".join(
            f"{k} {v['value']:.2f}, {format_pct(v['label_agreement'], 1)}%"
            + (f" (candidates before selection {format_pct(v['before_selection']['label_agreement'], 1)}%)"
               if v.get("before_selection") else "") for k, v in q.items())
            + (f"; real held-out images {data['floor']['value']:.2f}, {format_pct(data['floor']['label_agreement'], 1)}%"
               if data.get("floor") else "") + ".")
    stores = sorted({r["store"] for r in rows if r["store"]})
    for store in stores:
        arm_rows = [r for r in rows if r["store"] == store]
        for key, label, n in (("aa", "AutoAttack", data["aa_n"]), ("pgd_best", "test PGD (best epoch)",
                                                                     data["test_n"])):
            c = compare(arm_rows, real, key, n)
            if c is None:
                continue
            out.append(_versus(f"{label}, {store} (ratio {arm_rows[0]['ratio']:g}, {c['n_a']} seed(s))",
                               f"real only ({c['n_b']} seed(s))", c))
    for a, b in same_generator_pairs(data, stores):
        c = compare([r for r in rows if r["store"] == a], [r for r in rows if r["store"] == b], "aa", data["aa_n"])
        if c is None:
            continue
        out.append(_versus(f"AutoAttack, {a} ({c['n_a']} seed(s))",
                           f"{b} ({c['n_b']} seed(s)), both from {data['quality'][a]['generator']}", c))
    gaps = [(r["arm"], r["pgd_gap"], r["best_epoch"], r["epochs"]) for r in rows if r["pgd_gap"] is not None]
    if gaps:
        out.append("Robust overfitting (test PGD best − last epoch, points; standard error of one accuracy "
                   f"≈ {100 * (_se(0.6, data['test_n']) or 0):.1f}): " + ", ".join(
                       f"{a} {100 * g:+.2f} (best epoch {b}/{e})" for a, g, b, e in gaps) + ".")
    return out


def _figure(path: Path, draw) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.6), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    draw(ax)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def store_points(data: dict[str, Any], key: str, generator: str | None = None) -> list[dict[str, Any]]:
    """One point per store with finished, attacked arms: ``key`` (its FD or its number of images), the mean
    AutoAttack over its seeds and the standard error of that mean; ``generator``: only that generator's stores."""
    finished = [r for r in data["rows"] if r["finished"] and r.get("aa") is not None and r["store"]]
    points = []
    for store in dict.fromkeys(r["store"] for r in finished):
        if generator is not None and (data["quality"].get(store) or {}).get("generator") != generator:
            continue
        group = [r for r in finished if r["store"] == store and r.get(key) is not None]
        if group:
            values = [r["aa"] for r in group]
            m = sum(values) / len(values)
            points.append({"store": store, "x": group[0][key], "mean": m, "values": values, "n": len(values),
                           "se": (_se(m, data["aa_n"]) or 0) / math.sqrt(len(values)),
                           "selected": (group[0].get("keep_fraction") or 1) < 1})
    return points


def figures(data: dict[str, Any], fig_dir: Path) -> dict[str, Path]:
    rows = [r for r in data["rows"] if r.get("history")]
    best = best_generator(data)
    made = {}

    def pgd_vs_epoch(ax):
        cmap = ["tab:blue", "tab:green", "tab:red", "tab:purple", "tab:orange", "tab:brown", "tab:pink",
                "tab:olive", "tab:cyan"]
        others = iter(cmap * 3)
        for r in rows:
            pts = [(h["epoch"], 100 * h["test_pgd_acc"]) for h in r["history"] if h.get("test_pgd_acc") is not None]
            if pts:
                real = r["store"] is None
                ax.plot(*zip(*pts), "--" if real else "-", color="black" if real else next(others), linewidth=1.1,
                        marker="o", markersize=2.5, label=r["arm"])
        ax.set_xlabel("epoch")
        ax.set_ylabel("test PGD accuracy (%)")
        ax.set_title(f"{data['name']}: test PGD vs epoch (dashed black = real data only)", fontsize=9)
        ax.legend(fontsize=7, ncol=2, loc="lower right")

    def robust_vs(key, xlabel, title, generator=None):
        """AutoAttack of every store against ``key``: each seed a small dot, the store's mean over its seeds with
        ± 1 standard error of that mean; real-only training as a dashed line in its ± 1 standard-error band (and,
        for the amount of generated data, as the point at zero). ``generator``: only that generator's stores."""
        def draw(ax):
            finished = [r for r in data["rows"] if r["finished"] and r.get("aa") is not None]
            real = [r["aa"] for r in finished if r["store"] is None]
            if real:
                m = sum(real) / len(real)
                se = (_se(m, data["aa_n"]) or 0) / math.sqrt(len(real))
                ax.axhline(100 * m, color="black", linestyle="--", linewidth=1,
                           label=f"real only (mean of {len(real)} seed{'s' if len(real) > 1 else ''})")
                ax.axhspan(100 * (m - se), 100 * (m + se), color="black", alpha=0.08, linewidth=0)
                if key == "n_generated":
                    ax.errorbar([0], [100 * m], yerr=[100 * se], fmt="D", color="black", capsize=3)
                    ax.scatter([0] * len(real), [100 * v for v in real], s=9, color="black", alpha=0.4)
            every = list(data["quality"])  # one colour per store in every figure
            for i, p in enumerate(store_points(data, key, generator)):
                color = f"C{(every.index(p['store']) if p['store'] in every else i) % 10}"
                label = p["store"] + (f" ({p['n']} seeds)" if p["n"] > 1 else "") + (" selected" if p["selected"] else "")
                ax.errorbar([p["x"]], [100 * p["mean"]], yerr=[100 * p["se"]], fmt="s" if p["selected"] else "o",
                            color=color, capsize=3, label=label)
                if p["n"] > 1:
                    ax.scatter([p["x"]] * p["n"], [100 * v for v in p["values"]], s=9, color=color, alpha=0.5)
            ax.set_xlabel(xlabel)
            ax.set_ylabel("AutoAttack accuracy (%), ± 1 standard error")
            ax.set_title(f"{data['name']}: {title}", fontsize=9)
            ax.legend(fontsize=7)
        return draw

    if any(any(h.get("test_pgd_acc") is not None for h in r["history"]) for r in rows):
        made["test PGD vs epoch"] = _figure(fig_dir / "pgd_vs_epoch.png", pgd_vs_epoch)
    if any(r["finished"] and r.get("fd") is not None and r.get("aa") is not None for r in data["rows"]):
        made["robust accuracy vs classifier FD"] = _figure(
            fig_dir / "aa_vs_fd.png", robust_vs("fd", "classifier FD of the store (lower is better)",
                                                "robust accuracy vs generator quality"))
        made["robust accuracy vs amount of generated data"] = _figure(
            fig_dir / "aa_vs_amount.png", robust_vs(
                "n_generated", "generated images in the store (0 = real data only)",
                f"robust accuracy vs amount of generated data ({best or 'every'} generator)", generator=best))
    return made


def render(data: dict[str, Any], spec: Any, figs: dict[str, str]) -> str:
    test_n, aa_n = data["test_n"], data["aa_n"]
    lines = [f"# Study `{data['name']}`", ""] + [f"- {f}" for f in findings(data, spec)] + [""]
    lines += ["## Stores", "", "| store | generator | EDM kimg | images | keep fraction | classifier FD | "
              "label agreement (%) | before selection (%) |", "|---|---|---|---|---|---|---|---|"]
    for name, q in data["quality"].items():
        if q:
            before = q.get("before_selection") or {}
            lines.append(f"| {name} | {q['generator']} | {q['kimg']:g} | {q['n_images']:,} | {q['keep_fraction']:g} "
                         f"| {q['value']:.3f} | {format_pct(q['label_agreement'])} | {format_pct(before.get('label_agreement'))} |")
    if data.get("floor"):
        f = data["floor"]
        lines.append(f"| real, held out ({f['source']}) | — | — | {f['n']:,} | — | {f['value']:.3f} | "
                     f"{format_pct(f['label_agreement'])} | — |")
    lines += ["", "## Arms", "", "| arm | store | classifier FD | label agreement | generated images | ratio | seed | "
              "best epoch | clean best | PGD best | AA best | clean last | PGD last | PGD best − last |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        if "best_epoch" not in r:
            lines.append(f"| {r['arm']} (not run) | {r['store'] or 'none'} | | | | | {r['seed']} | | | | | | | |")
            continue
        gap = "—" if r["pgd_gap"] is None else f"{100 * r['pgd_gap']:+.2f}"
        quality = ("— | — | 0" if r["store"] is None else
                   f"{'—' if r['fd'] is None else format(r['fd'], '.3f')} | {format_pct(r['label_agreement'])} | "
                   f"{'—' if r['n_generated'] is None else format(r['n_generated'], ',')}")
        lines.append(f"| {r['arm']}{'' if r['finished'] else ' (unfinished)'} | {r['store'] or 'none'} | {quality} | "
                     f"{r['ratio']:g} | {r['seed']} | {r['best_epoch']}/{r['epochs']} | {format_pct(r['clean_best'])} | "
                     f"{format_pct(r['pgd_best'])} | {format_pct(r['aa'])} | {format_pct(r['clean_last'])} | {format_pct(r['pgd_last'])} | "
                     f"{gap} |")
    aa = spec.autoattack
    lines += ["", f"Accuracies in %. Clean and PGD on the first {test_n:,} test images (standard error of one "
                  f"accuracy near 60%: {100 * _se(0.6, test_n):.1f} points); AA best: "
                  f"{' + '.join(a.upper() for a in aa.attacks)} (pyautoattack, APGD-T with {int(aa.get('targets') or 9)}"
                  f" target classes) on the first {aa_n:,} test images, the selected checkpoint (standard error "
                  f"{100 * _se(0.6, aa_n):.1f} points). A difference is called resolved when it exceeds twice its "
                  "standard error and the range of the seeds."]
    lines += ["", "## Figures", ""] + [f"![{k}]({v})" for k, v in figs.items()]
    t = data.get("timing") or {}
    if t:
        lines += ["", "Seconds per stage, summed over every robustdiff-study command (two commands side by side count "
                  "their overlap twice): " + ", ".join(f"{k} {v:.0f}" for k, v in t.items()) + "."]
    return "\n".join(lines) + "\n"


def write_arms_report(out: str | os.PathLike, spec: Any) -> Path:
    out = Path(out)
    data = collect(out, spec)
    figs = {k: str(p.relative_to(out)) for k, p in figures(data, out / "figures").items()}
    atomic_write_json(out / "results.json", data | {"findings": findings(data, spec)})
    report = out / "report.md"
    atomic_write_text(report, render(data, spec, figs))
    return report
