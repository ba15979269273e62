"""`make bench`: every benchmark, then one table.

Each benchmark runs in its own process (its memory figures are its own) and compares its loops side by
side within that run: TRADES training (ours vs plain PyTorch vs the reference way), the generated-data
pipeline (our store vs the reference's .npz), EDM sampling (fp32 vs bf16, compiled), and AutoAttack
evaluation (default batch vs a larger one). Their outputs stream as they run; the table at the end
collects the headline figures and their targets.

    python benchmarks/run_all.py                  # about 12 min on 2 cores (bench_data with 1M images: ~10 GB disk)
    python benchmarks/run_all.py --quick          # smaller sizes (200k generated images, 5 timed steps)
    python benchmarks/run_all.py --only train,edm --out bench.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHES = ("train", "data", "edm", "eval")


def commands(name: str, out: Path, quick: bool) -> list[str]:
    py = [sys.executable]
    if name == "train":
        return py + [str(HERE / "bench_train.py"), "--out", str(out)] + (["--timed", "5"] if quick else [])
    if name == "data":
        return py + [str(HERE / "bench_data.py"), "--json", str(out)] + (["--n", "200000"] if quick else [])
    if name == "edm":
        return py + [str(HERE / "bench_edm.py"), "--threads", "1", "--out", str(out)] + ([] if quick else ["--compile"])
    if name == "eval":
        return py + [str(HERE / "bench_eval.py"), "--out", str(out)]
    raise ValueError(name)


def rows_for(name: str, r: dict) -> list[tuple[str, str, str, str, str]]:
    """(measurement, ours, baseline, ratio, target) rows of one benchmark's JSON."""
    def f(v, digits=1):
        return "—" if v is None else f"{v:,.{digits}f}"

    out = []
    if name == "train":
        by = {row["loop"]: row for row in r["rows"]}
        cfg = r["config"]
        head = f"TRADES-{cfg['steps']} {cfg['model']} b{cfg['batch']} img/s"
        ours = by["ours"]
        for other, target in (("plain", "≥ 0.95"), ("reference", "≥ 2")):
            if other in by:
                out.append((f"{head}: ours ({ours['settings']}) vs {other}", f(ours["images_per_s"]),
                            f(by[other]["images_per_s"]), f(ours["images_per_s"] / by[other]["images_per_s"], 3),
                            target))
        if "plain" in by and "plain-fp32" in by:
            out.append((f"{head}: plain {by['plain']['settings']} vs plain fp32", f(by["plain"]["images_per_s"]),
                        f(by["plain-fp32"]["images_per_s"]),
                        f(by["plain"]["images_per_s"] / by["plain-fp32"]["images_per_s"], 3), ""))
    elif name == "data":
        ours, ref = r["results"]["ours"], r["results"]["reference"]
        n = r["args"]["n"]
        out.append((f"data {n:,} generated: images/s, store vs .npz", f(ours["images_per_s"]),
                    f(ref["images_per_s"]), f(ours["images_per_s"] / ref["images_per_s"], 2), "≥ 5"))
        out.append(("data: time to first batch, s (lower is better)", f(ours["first_batch_s"], 2),
                    f(ref["first_batch_s"], 2), f(ref["first_batch_s"] / max(ours["first_batch_s"], 1e-9), 1), ""))
        out.append(("data: loader peak anon RSS, MiB (lower is better)", f(ours["peak_anon_mib"], 0),
                    f(ref["peak_anon_mib"], 0), f(ref["peak_anon_mib"] / max(ours["peak_anon_mib"], 1e-9), 1), ""))
    elif name == "edm":
        a = r["args"]
        head = f"EDM {a['preset']} {a['resolution']}px b{a['batch']} {a['steps']} steps img/s"
        out.append((f"{head}: bf16 vs fp32", f(r["sampling_bf16_img_s"], 2), f(r["sampling_fp32_img_s"], 2),
                    f(r["bf16_over_fp32"], 2), "GPU: ≥ 2"))
        out.append(("EDM bf16 vs fp32: max |Δpixel| (uint8)", str(r["max_abs_pixel_diff"]), "—", "", ""))
        if r.get("sampling_bf16_compiled_img_s"):
            out.append((f"{head}: bf16 + compile vs fp32", f(r["sampling_bf16_compiled_img_s"], 2),
                        f(r["sampling_fp32_img_s"], 2),
                        f(r["sampling_bf16_compiled_img_s"] / r["sampling_fp32_img_s"], 2), ""))
    elif name == "eval":
        rows = r["rows"]
        base, big = rows[0], rows[-1]
        a = r["args"]
        out.append((f"AutoAttack ({a['attacks']}) {a['n']} pts points/s: batch {big['batch_size']} vs "
                     f"{base['batch_size']}", f(big["points_per_s"], 2), f(base["points_per_s"], 2),
                     f(big["points_per_s"] / base["points_per_s"], 2), ""))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default=",".join(BENCHES), help=f"comma-separated subset of {','.join(BENCHES)}")
    p.add_argument("--quick", action="store_true", help="smaller sizes")
    p.add_argument("--out", default=None, help="write every benchmark's JSON and the table here")
    args = p.parse_args()
    wanted = [b for b in args.only.split(",") if b]
    unknown = sorted(set(wanted) - set(BENCHES))
    if unknown:
        p.error(f"--only: unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHES)}")

    results, failed, seconds = {}, [], {}
    with tempfile.TemporaryDirectory(prefix="robustdiff-bench-") as tmp:
        for name in wanted:
            out = Path(tmp) / f"{name}.json"
            print(f"\n===== bench {name}: {' '.join(commands(name, out, args.quick)[1:])}", flush=True)
            started = time.perf_counter()
            rc = subprocess.call(commands(name, out, args.quick))
            seconds[name] = time.perf_counter() - started
            if rc != 0 or not out.is_file():
                failed.append(f"{name} (exit {rc})")
                continue
            results[name] = json.loads(out.read_text())

    table = [row for name in wanted if name in results for row in rows_for(name, results[name])]
    widths = [max(len(h), *(len(r[i]) for r in table)) if table else len(h)
              for i, h in enumerate(("measurement", "ours", "baseline", "ratio", "target"))]
    print("\n===== robustdiff benchmarks (each comparison measured side by side in one run; " +
          ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()) + ")")
    header = ("measurement", "ours", "baseline", "ratio", "target")
    print("  ".join(h.ljust(widths[0]) if i == 0 else h.rjust(widths[i]) for i, h in enumerate(header)))
    for row in table:
        print("  ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(row)))
    if failed:
        print(f"failed: {', '.join(failed)}")
    if args.out:
        Path(args.out).write_text(json.dumps({"results": results, "table": table, "seconds": seconds}, indent=2))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
