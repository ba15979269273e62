"""The benchmark scripts run (tiny sizes) and produce what `make bench` and the GPU check report.

The GPU check gets one short run on a lent GPU: a script error found there wastes the device time, so its CPU
smoke mode runs here. Timings are not asserted (benchmarks measure speed; tests never do).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.mark.slow
def test_gpu_check_smoke_runs_every_stage(tmp_path):
    """`gpu_check.sh --smoke`: every stage of the GPU check (the math, then the real entry points: train with an
    interrupt and a resume, AutoAttack eval, generate + store verify, DDP, both compile modes) at toy size."""
    out = tmp_path / "gpu_check.json"
    env = dict(_env(), PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(BENCH / "gpu_check.sh"), "--smoke", "--out", str(out), "--work", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=1500)
    log = (tmp_path / "gpu_check.log").read_text() if (tmp_path / "gpu_check.log").is_file() else ""
    assert proc.returncode == 0, proc.stderr[-3000:] + log[-3000:]
    r = json.loads(out.read_text())
    failed = {k: v.get("error") for k, v in r["stages"].items() if not v.get("ok")}
    assert not failed, f"{failed}\n{log[-4000:]}"
    assert list(r["stages"]) == ["math", "train", "train_reduce_overhead", "eval", "ddp", "generate", "train_compile"]
    # The math (gpu_check.py), merged at the top level.
    assert r["bf16_peak_tflops"] > 0
    for config in ("fp32", "bf16", "bf16+cl+fmnist"):
        t = r["trades"][config]
        # > 0 only: on a shared CPU the matmul peak and the step are timed at different moments, so the
        # fraction can exceed 1 under load; the bound means something on a GPU, not in this smoke run.
        assert t["images_per_s"] > 0 and t["fraction_of_bf16_peak"] > 0
    assert {"fp32", "bf16", "fp16"} <= set(r["edm"]) and r["edm"]["max_abs_dpixel_uint8"] >= 0
    # robustdiff-train: stopped mid-epoch 2, resumed from last.ckpt at that step, finished; timed and compared.
    train = r["stages"]["train"]
    assert train["resumed"] and train["finished"] and train["resumed_at_step"] == train["interrupted_at_step"]
    assert train["images_per_s"] > 0 and train["end_to_end_over_bare"] > 0 and train["eval_seconds_per_epoch"] > 0
    assert r["stages"]["eval"]["version"] == "standard" and r["stages"]["eval"]["points_per_s"] > 0
    assert r["stages"]["generate"]["verify"]["rc"] == 0 and r["stages"]["generate"]["images_per_s"] > 0
    assert r["stages"]["ddp"]["backend"] == "gloo"  # nccl on the GPU
    assert r["stages"]["train_reduce_overhead"]["compile"] == "reduce-overhead"
    assert {"trades_fraction_of_bf16_peak", "edm_bf16_over_fp32", "train_end_to_end_over_bare",
            "autoattack_points_per_s", "generate_images_per_s"} <= set(r["summary"])


def test_bench_train_times_every_loop_and_run_all_tabulates_it(tmp_path):
    import run_all

    out = tmp_path / "train.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH / "bench_train.py"), "--model", "wrn-10-1", "--batch", "16", "--steps", "1",
         "--warmup", "1", "--timed", "2", "--workers", "1", "--out", str(out)],
        env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    loops = {row["loop"]: row for row in r["rows"]}
    assert set(loops) == {"ours", "plain", "plain-fp32", "reference"}
    assert all(row["steps_timed"] == 2 and row["images_per_s"] > 0 for row in loops.values())
    assert loops["plain-fp32"]["settings"] == "32-true" and loops["ours"]["settings"] == loops["plain"]["settings"]
    checks = {c["check"]: c for c in r["checks"]}
    assert checks["ours / reference throughput"]["target"] == 2.0
    table = run_all.rows_for("train", r)
    assert [row[4] for row in table] == ["≥ 0.95", "≥ 2", ""]
    ratio = loops["ours"]["images_per_s"] / loops["reference"]["images_per_s"]
    assert table[1][3] == f"{ratio:,.3f}"


def test_run_all_refuses_unknown_benchmarks():
    proc = subprocess.run([sys.executable, str(BENCH / "run_all.py"), "--only", "train,gpu"], env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown benchmark(s) gpu" in proc.stderr


@pytest.mark.parametrize("name", ["data", "edm", "eval"])
def test_run_all_rows_for_each_benchmark(name):
    import run_all

    samples = {
        "data": {"args": {"n": 1000}, "results": {
            "ours": {"images_per_s": 100.0, "first_batch_s": 0.1, "peak_anon_mib": 10.0},
            "reference": {"images_per_s": 25.0, "first_batch_s": 2.0, "peak_anon_mib": 50.0}}},
        "edm": {"args": {"preset": "small", "resolution": 28, "batch": 4, "steps": 2}, "sampling_fp32_img_s": 2.0,
                "sampling_bf16_img_s": 3.0, "bf16_over_fp32": 1.5, "max_abs_pixel_diff": 3,
                "sampling_bf16_compiled_img_s": None},
        "eval": {"args": {"attacks": "apgd-ce", "n": 8},
                 "rows": [{"batch_size": 4, "points_per_s": 1.0}, {"batch_size": 8, "points_per_s": 1.5}]},
    }
    rows = run_all.rows_for(name, samples[name])
    ratios = {"data": "4.00", "edm": "1.50", "eval": "1.50"}
    assert rows and rows[0][3] == ratios[name]
