"""The GPU check: the math (``gpu_check.py``), then robustdiff's real entry points on the device.

Run by ``benchmarks/gpu_check.sh`` (which installs the bundled wheels first). Stages, in this order (the
priority: ``--budget-s`` cuts the last ones), each a separate process with its own time box, each merged into
the JSON as soon as it ends (a failing or cut stage records its error and the check goes on):

  math       gpu_check.py: bf16 matmul peak; WRN-28-10 TRADES fp32 / bf16 / channels_last / compile at batch
             512 (images/s, fraction of the bf16 peak, memory), also on 28×28×1 batches (the bare step the
             training stages are compared with); EDM DDPM++ sampling fp32 / bf16 / fp16 with pixel differences
  train      robustdiff-train (gpu_train_probe.py: the real entry point plus a step timer): WRN-28-10,
             batch 512, Fashion-MNIST + a synthetic generated store (ratio 0.3), precision=bf16-mixed
             channels_last=true, 2 short epochs; stopped mid-epoch 2 by a SIGTERM it sends itself (the test
             aid of tests/aids, through PYTHONPATH), then resumed from last.ckpt by the same command.
             End-to-end images/s, its ratio to the bare step, eval s/epoch
  train_reduce_overhead
             the train stage (one epoch, no resume) with compile=reduce-overhead (CUDA graphs, with the
             attack's graph switches), and which graphs torch.compile says it skipped
  eval       robustdiff-eval: AutoAttack standard on the first 500 test points of that model: points/s
  ddp        robustdiff-train trainer=ddp trainer.devices=1: the NCCL code paths on one card
  generate   robustdiff-generate (Lightning Fabric) precision=bf16 compile=true, 3000 images from a
             random-weight DDPM++ 32×32×3 network, then robustdiff-store verify: images/s
  train_compile
             the train stage (one epoch) with compile=true

``--smoke`` runs every stage on the CPU at toy size (wrn-10-1, a few steps, the small U-Net, a few
AutoAttack points; compiled stages with TORCH_COMPILE_DISABLE=1), so a script error shows here, not on
the GPU. Results: ``--out`` (default ``$OUT/gpu_check.json``), the stages' output in ``gpu_check.log``
beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # the synthetic store and network are written with robustdiff's own code
BENCH = ROOT / "benchmarks"
AIDS = ROOT / "tests" / "aids"  # the test aids (sitecustomize.py installs those its AIDS_* variables name)
# The order is the priority: a stage that would start with under 15 s of the budget left is skipped.
STAGES = ("math", "train", "train_reduce_overhead", "eval", "ddp", "generate", "train_compile")
# The most seconds each stage may take on one H100/H200; together more than the 8 minutes, since most stages
# end well inside their box. What the later ones get is cut to what is left.
BOXES = {"math": 150, "train": 100, "train_reduce_overhead": 120, "eval": 90, "ddp": 45, "generate": 75,
         "train_compile": 110}


def stop(proc: subprocess.Popen) -> int:
    """SIGTERM to the process group this check started (robustdiff-train saves last.ckpt), SIGKILL after 15 s."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        return proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return proc.wait()


def stop_after_steps(steps: int) -> dict[str, str]:
    """The environment in which robustdiff-train sends itself a real SIGTERM after optimiser step ``steps``
    (saves last.ckpt at that step and exits 143), as a ``kill`` at that moment would: the test aid
    robustdiff_aids.stop_after_steps, installed at start-up by tests/aids/sitecustomize.py."""
    path = [str(AIDS), *(p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p)]
    return {"PYTHONPATH": os.pathsep.join(path), "AIDS_STOP_AFTER_STEPS": str(steps)}


def _terminate(signum, frame):
    raise SystemExit(128 + signum)


class Check:
    """Sizes, paths and the JSON of one run of the check."""

    def __init__(self, args: argparse.Namespace, math_args: list[str]):
        self.args, self.math_args = args, math_args
        self.smoke = args.smoke
        self.work = Path(args.work).resolve()
        self.work.mkdir(parents=True, exist_ok=True)
        self.out = Path(args.out).resolve() if args.out else (
            Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT") else self.work / "gpu_check.json")
        self.log_path = self.out.with_name(self.out.stem + ".log")
        self.began = time.perf_counter()
        self.deadline = self.began + args.budget_s
        self.result: dict = {"check": "gpu_pipeline", "smoke": self.smoke, "stages": {}, "summary": {}}
        bundle_data = ROOT / "gpu_bundle" / "data"
        self.data_dir = args.data_dir or (str(bundle_data) if (bundle_data / "fashionmnist").is_dir() else "data")
        if self.smoke:
            self.model, self.batch, self.val, self.steps_per_epoch = "wrn-10-1", 16, 32, 4
            self.sizes = {"norm.steps": 2, "eval.steps": 2, "eval.batch_size": 32, "limit_test": 32}
            self.accelerator = "cpu"
            self.aa_points, self.gen_n, self.gen_batch, self.gen_steps = 6, 30, 10, 2
            self.gen_preset, self.gen_res, self.gen_channels = "small", 16, 3
            self.warmup = 1
        else:
            self.model, self.batch, self.val, self.steps_per_epoch = "wrn-28-10", 512, 1024, 20
            self.sizes = {"limit_test": 1024}
            self.accelerator = "gpu"
            self.aa_points, self.gen_n, self.gen_batch, self.gen_steps = args.aa_points, 3000, 500, 18
            self.gen_preset, self.gen_res, self.gen_channels = "ddpmpp", 32, 3
            self.warmup = 3

    # ------------------------------------------------------------------ bookkeeping
    def save(self) -> None:
        self.result["elapsed_s"] = time.perf_counter() - self.began
        from robustdiff.utils.io import atomic_write_text

        self.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.out, json.dumps(self.result, indent=2, default=str))  # stage order kept

    def log(self, msg: str) -> None:
        line = f"[{time.perf_counter() - self.began:6.1f} s] {msg}"
        print(line, flush=True)
        with open(self.log_path, "a") as f:
            f.write(line + "\n")

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def run(self, name: str, cmd: list[str], box: float, env: dict | None = None,
            ok_codes: tuple[int, ...] = (0,), allow_timeout: bool = False) -> dict:
        """Run one command in its own process group, killed (SIGTERM, then SIGKILL) after ``box`` seconds.
        Returns {"cmd", "rc", "seconds", "timed_out"}; raises RuntimeError for an unexpected exit status, and
        for a command stopped at its box unless ``allow_timeout``."""
        full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        start = time.perf_counter()
        with open(self.log_path, "a") as log:
            log.write(f"\n$ {' '.join(cmd)}\n")
            log.flush()
            offset = log.tell()
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env, cwd=self.work,
                                    start_new_session=True)
            timed_out = False
            try:
                rc = proc.wait(timeout=max(box, 1))
            except subprocess.TimeoutExpired:
                timed_out = True
                rc = stop(proc)
            finally:  # the check itself stopped (its own time limit): the stage's process group goes too
                if proc.poll() is None:
                    stop(proc)
        run = {"cmd": " ".join(cmd), "rc": rc, "seconds": time.perf_counter() - start, "timed_out": timed_out}
        self.log(f"{name}: exit {rc} after {run['seconds']:.1f} s" + (" (time box reached)" if timed_out else ""))
        if timed_out:
            if allow_timeout:
                return run
            raise RuntimeError(f"{name}: stopped after its time box of {box:.0f} s")
        if rc not in ok_codes:
            raise RuntimeError(f"{name}: exit status {rc} (see {self.log_path.name}): {self.output(offset)[-1500:]}")
        return run

    def output(self, offset: int) -> str:
        """What the log holds from ``offset`` on (a stage's own output)."""
        with open(self.log_path, errors="replace") as f:
            f.seek(offset)
            return f.read()

    def python(self, *args: str) -> list[str]:
        return [sys.executable, *args]

    # ------------------------------------------------------------------ inputs made on the device
    def synthetic_store(self) -> Path:
        """A generated-data store of random 28×28×1 images with balanced labels (the train stages' store)."""
        import numpy as np

        from robustdiff.data.store import StoreWriter

        path = self.work / "store-synthetic"
        if (path / "manifest.json").is_file():
            return path
        n = 2048 if self.smoke else 10240
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8)
        labels = np.arange(n, dtype=np.int64) % 10
        with StoreWriter(path, (28, 28, 1), 10, shard_size=n // 2,
                         provenance={"generator": "gpu_pipeline synthetic: uniform random pixels"}) as w:
            w.append(images, labels)
        return path

    def network(self) -> Path:
        """A random-weight class-conditional EDM network (robustdiff network.pt) for the generate stage."""
        import torch

        from robustdiff.diffusion.edm import EDMPrecond
        from robustdiff.training.diffusion import network_kwargs, save_network

        path = self.work / f"edm-{self.gen_preset}-{self.gen_res}-random.pt"
        if path.is_file():
            return path
        torch.manual_seed(0)
        kwargs = network_kwargs(self.gen_preset, self.gen_res, self.gen_channels, 10)
        net = EDMPrecond(**kwargs)
        with torch.no_grad():  # the layers EDM initialises at 1e-5 get a normal scale: non-trivial outputs
            for name, p in net.named_parameters():
                if name.endswith(("conv1.weight", "proj.weight", "aux_conv.weight")):
                    p.mul_(1e5)
        save_network(path, kwargs, net)
        return path

    # ------------------------------------------------------------------ stages
    def iterations_per_epoch(self, limit_train: int) -> int:
        return -(-limit_train // self.batch)  # ceil(N_base / B), N_base before the validation split

    def train_overrides(self, name: str, epochs: int, extra: dict[str, object]) -> list[str]:
        o: dict[str, object] = {
            "name": name, "run_root": self.work / "runs", "data_dir": self.data_dir, "dataset": "fashionmnist",
            "model": self.model, "batch_size": self.batch, "val_size": self.val,
            "limit_train": self.val + self.batch * self.steps_per_epoch, "epochs": epochs,
            "generated": self.synthetic_store(), "ratio": 0.3, "precision": "bf16-mixed", "channels_last": "true",
            "logger": "csv", "trainer": "gpu", "trainer.accelerator": self.accelerator,
            "trainer.enable_progress_bar": "false", **self.sizes}
        o.update(extra)
        return [f"{k}={v}" for k, v in o.items()]

    def train_run(self, stage: str, name: str, epochs: int, extra: dict[str, object], box: float,
                  env: dict | None = None, ok_codes: tuple[int, ...] = (0,), allow_timeout: bool = False) -> dict:
        timing = self.work / f"timing-{name}-{int(time.time() * 1000)}.json"
        cmd = self.python(str(BENCH / "gpu_train_probe.py"), *self.train_overrides(name, epochs, extra))
        run = self.run(stage, cmd, box, env={"ROBUSTDIFF_TIMING": str(timing),
                                             "ROBUSTDIFF_TIMING_WARMUP": str(self.warmup), **(env or {})},
                       ok_codes=ok_codes, allow_timeout=allow_timeout)
        run["timing"] = json.loads(timing.read_text()) if timing.is_file() else None
        return run

    def bare_rate(self, compiled: bool) -> float | None:
        trades = self.result.get("trades", {})
        key = "bf16+cl+compile+fmnist" if compiled else "bf16+cl+fmnist"
        return (trades.get(key) or {}).get("images_per_s")

    def summarise_train(self, r: dict, compiled: bool) -> None:
        timed = [run["timing"] for run in r["runs"] if run.get("timing") and not run["timing"].get("sync_debug")]
        rates = [e["images_per_s"] for t in timed for e in t["epochs"]]
        if timed and timed[0]["step_times"]:
            steps = timed[0]["step_times"]
            w = min(self.warmup, len(steps)) - 1
            r["warmup_s"] = steps[w][1]  # process start to the end of the warm-up steps (compilation included)
            r["steps_done"] = len(steps)
            if not rates and len(steps) > w + 1:  # cut short before an epoch ended: the host clock's rate
                n = steps[-1][0] - steps[w][0]
                r["images_per_s_unsynced"] = n * timed[0]["batch_size"] / (steps[-1][1] - steps[w][1])
        evals = [s for run in r["runs"] if run.get("timing") for s in run["timing"]["eval_seconds"]]
        if rates:
            r["images_per_s"] = max(rates)
            bare = self.bare_rate(compiled)
            if bare:
                r["bare_step_images_per_s"] = bare
                r["end_to_end_over_bare"] = r["images_per_s"] / bare
        if evals:
            r["eval_seconds_per_epoch"] = sum(evals) / len(evals)

    def stage_math(self, box: float) -> dict:
        out = self.work / "math.json"
        cmd = self.python(str(BENCH / "gpu_check.py"), "--out", str(out), *self.math_args)
        if self.smoke:
            cmd.append("--smoke")
        elif "--budget-s" not in self.math_args:
            cmd += ["--budget-s", str(max(box - 70, 10))]  # no compiled configuration starts after this
        try:
            run = self.run("math", cmd, box)
        finally:
            if out.is_file():  # what it measured, even when cut short
                math = json.loads(out.read_text())
                self.result.update({k: v for k, v in math.items() if k != "elapsed_s"})
                self.result["math_elapsed_s"] = math.get("elapsed_s")
        return run

    def stage_train(self, box: float) -> dict:
        """bf16-mixed + channels_last, eager: interrupted in epoch 2, then resumed by the same command."""
        ipe = self.iterations_per_epoch(self.val + self.batch * self.steps_per_epoch)
        stop_at = ipe + ipe // 2
        r: dict = {"runs": [], "iterations_per_epoch": ipe, "interrupted_at_step": stop_at}
        first = self.train_run("train", "train", 2, {}, box, env=stop_after_steps(stop_at),
                               ok_codes=(0, 128 + signal.SIGTERM))
        r["runs"].append(first)
        ckpt = self.work / "runs" / "train" / "checkpoints" / "last.ckpt"
        if not ckpt.is_file():
            raise RuntimeError(f"train: no {ckpt} after the interrupted run")
        # The resumed part also counts the step's host syncs (torch.cuda sync-debug mode; not in its timing).
        second = self.train_run("train (resume)", "train", 2, {}, max(min(box, self.left()) - first["seconds"], 10),
                                env={"ROBUSTDIFF_SYNC_DEBUG": "1"})
        r["runs"].append(second)
        summary = json.loads((self.work / "runs" / "train" / "summary.json").read_text())
        timing = second.get("timing") or {}
        r["resumed_at_step"] = timing.get("first_step", 0) - 1
        r["resumed"] = r["resumed_at_step"] == stop_at
        if timing.get("sync_debug"):
            r["host_syncs_in_steps"] = timing.get("host_syncs", {})
        r["finished"] = bool(summary.get("finished"))
        r["summary"] = {k: summary.get(k) for k in ("best_epoch", "test_clean_acc_last", "test_pgd_acc_last")}
        self.summarise_train(r, compiled=False)
        return r

    def stage_eval(self, box: float) -> dict:
        run_dir = self.work / "runs" / "train"
        if not (run_dir / "model.pt").is_file():
            raise RuntimeError(f"eval: {run_dir}/model.pt is missing (the train stage did not finish)")
        out = self.work / "eval"
        cmd = self.python("-m", "robustdiff.cli.evaluate", str(run_dir), "--n-examples", str(self.aa_points),
                          "--attacks", "clean,autoattack", "--batch-size", str(max(self.aa_points, 1)),
                          "--out", str(out), "--no-resume", "--device", "cpu" if self.smoke else "cuda")
        offset = self.log_path.stat().st_size if self.log_path.is_file() else 0
        r = self.run("eval", cmd, box, allow_timeout=True)
        if r["timed_out"]:  # eval.json comes at the end: keep how far each attack got
            progress = [line.strip() for line in self.output(offset).splitlines() if "AutoAttack" in line]
            r.update(ok=False, error=f"eval: stopped after its time box of {box:.0f} s", progress=progress[-6:])
            return r
        ev = json.loads((out / "eval.json").read_text())
        aa = ev["autoattack"]
        r.update(points=ev["n_examples"], clean_acc=ev["clean"]["acc"], robust_acc=aa["robust_acc"],
                 version=aa["version"], aa_seconds=aa["seconds"], points_per_s=ev["n_examples"] / aa["seconds"])
        return r

    def stage_generate(self, box: float) -> dict:
        network = self.network()
        store = self.work / "store-generated"
        cmd = self.python("-m", "robustdiff.cli.generate", f"network={network}", f"n={self.gen_n}",
                          f"out={store}", f"steps={self.gen_steps}", f"batch_size={self.gen_batch}",
                          f"shard_size={self.gen_batch}", "precision=bf16", "compile=true",
                          "trainer=gpu", f"trainer.accelerator={self.accelerator}", "progress=false")
        env = {"TORCH_COMPILE_DISABLE": "1"} if self.smoke else None
        start = time.perf_counter()
        r = self.run("generate", cmd, box, env=env)
        r["images"] = self.gen_n
        r["images_per_s_whole_process"] = self.gen_n / r["seconds"]  # start-up and compilation included
        # Shards are written one batch each, as they finish: the spacing of their files is the steady rate.
        stamps = sorted(p.stat().st_mtime_ns for p in store.glob("shard-*.images.u8"))
        if len(stamps) >= 2:  # from the end of the first shard (which holds the compilation) to the last
            r["images_per_s"] = (len(stamps) - 1) * self.gen_batch / max((stamps[-1] - stamps[0]) / 1e9, 1e-9)
        verify = self.run("store verify", self.python("-m", "robustdiff.cli.store", "verify", str(store), "--no-progress"),
                          max(min(60.0, box - (time.perf_counter() - start)), 10))
        r["verify"] = {"rc": verify["rc"], "seconds": verify["seconds"]}
        r["network"] = f"{self.gen_preset} {self.gen_res}×{self.gen_res}×{self.gen_channels}, random weights"
        return r

    def stage_ddp(self, box: float) -> dict:
        steps = 4 if not self.smoke else 2
        extra = {"trainer": "ddp", "trainer.devices": 1, "limit_train": self.val + self.batch * steps}
        offset = self.log_path.stat().st_size if self.log_path.is_file() else 0
        r = {"runs": [self.train_run("ddp", "ddp", 1, extra, box)]}
        log = self.output(offset)
        backends = [b for b in ("nccl", "gloo") if f"distributed_backend={b}" in log]
        r["backend"] = backends[0] if backends else None
        self.summarise_train(r, compiled=False)
        return r

    def stage_train_compiled(self, stage: str, mode: str, box: float) -> dict:
        env = {"TORCH_COMPILE_DISABLE": "1"} if self.smoke else None
        offset = self.log_path.stat().st_size if self.log_path.is_file() else 0
        run = self.train_run(stage, stage, 1, {"compile": mode}, box, env=env, allow_timeout=True)
        r = {"runs": [run], "compile": mode}
        if run["timed_out"]:  # what it did get through (warm-up time, steps, a host-clock rate) still counts
            r.update(ok=False, error=f"{stage}: stopped after its time box of {box:.0f} s")
        # What torch.compile says it did not do: CUDA graphs skipped (mutations, CPU tensors), graphs over the limit.
        r["compile_warnings"] = sorted({line.strip()[:300] for line in self.output(offset).splitlines()
                                        if "skipping cudagraphs" in line or "recompile_limit" in line
                                        or "cache_size_limit" in line or "graph break" in line.lower()})[:20]
        if self.smoke:
            r["note"] = "smoke: TORCH_COMPILE_DISABLE=1 (the command line and config are checked, nothing compiles)"
        self.summarise_train(r, compiled=True)
        return r

    def run_stage(self, name: str) -> None:
        box = min(BOXES[name] * (10 if self.smoke else 1), self.left())
        if box < 15:
            self.result["stages"][name] = {"skipped": f"time budget {self.args.budget_s:g} s spent"}
            self.log(f"{name}: skipped (budget)")
            self.save()
            return
        self.log(f"{name}: starting (time box {box:.0f} s)")
        try:
            if name == "math":
                r = self.stage_math(box)
            elif name == "train":
                r = self.stage_train(box)
            elif name == "eval":
                r = self.stage_eval(box)
            elif name == "generate":
                r = self.stage_generate(box)
            elif name == "ddp":
                r = self.stage_ddp(box)
            elif name == "train_compile":
                r = self.stage_train_compiled(name, "true", box)
            else:
                r = self.stage_train_compiled(name, "reduce-overhead", box)
            r.setdefault("ok", True)
        except Exception as e:  # a failed stage is recorded; the next one still runs
            r = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
            self.log(f"{name}: FAILED: {r['error'][:500]}")
        self.result["stages"][name] = r
        self.summary()
        self.save()

    def summary(self) -> None:
        """The headline figures, with their targets."""
        s: dict = {}
        trades = self.result.get("trades", {})
        bf16 = {k: v for k, v in trades.items() if k.startswith("bf16") and "fmnist" not in k and "images_per_s" in v}
        if bf16:
            best = max(bf16, key=lambda k: bf16[k]["images_per_s"])
            s["trades_best_config"] = best
            s["trades_images_per_s"] = bf16[best]["images_per_s"]
            s["trades_fraction_of_bf16_peak"] = bf16[best]["fraction_of_bf16_peak"]
            s["trades_fraction_target"] = 0.40
        edm = self.result.get("edm", {})
        if "fp32" in edm and "bf16" in edm:
            s["edm_bf16_over_fp32"] = edm["bf16"]["images_per_s"] / edm["fp32"]["images_per_s"]
            s["edm_target"] = 2.0
        for name in ("train", "train_compile", "train_reduce_overhead", "ddp"):
            st = self.result["stages"].get(name, {})
            if "end_to_end_over_bare" in st:
                s[f"{name}_end_to_end_over_bare"] = st["end_to_end_over_bare"]
            if "images_per_s" in st:
                s[f"{name}_images_per_s"] = st["images_per_s"]
        for name in ("train_compile", "train_reduce_overhead"):
            st = self.result["stages"].get(name, {})
            for key in ("warmup_s", "images_per_s_unsynced"):
                if key in st:
                    s[f"{name}_{key}"] = st[key]
        syncs = self.result["stages"].get("train", {}).get("host_syncs_in_steps")
        if syncs is not None:
            s["train_host_syncs_per_step_sites"] = len(syncs)  # Python lines that made a step wait (target 0)
        if "train_end_to_end_over_bare" in s:
            s["end_to_end_target"] = 0.95
        if "points_per_s" in self.result["stages"].get("eval", {}):
            s["autoattack_points_per_s"] = self.result["stages"]["eval"]["points_per_s"]
        if "images_per_s" in self.result["stages"].get("generate", {}):
            s["generate_images_per_s"] = self.result["stages"]["generate"]["images_per_s"]
        self.result["summary"] = s


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="every stage on the CPU at toy size")
    p.add_argument("--out", default=None, help="JSON path (default $OUT/gpu_check.json, else <work>/gpu_check.json)")
    p.add_argument("--work", default=None, help="scratch directory for runs and stores (default: a new temp dir)")
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST location (default gpu_bundle/data, else data)")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma list of {', '.join(STAGES)}")
    p.add_argument("--budget-s", type=float, default=470, help="no stage starts after this; each is cut to fit")
    p.add_argument("--aa-points", type=int, default=500, help="AutoAttack points of the eval stage")
    args, math_args = p.parse_known_args()
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        p.error(f"unknown stage(s) {', '.join(unknown)}; choose from {', '.join(STAGES)}")
    if args.work is None:
        import tempfile

        args.work = tempfile.mkdtemp(prefix="robustdiff-gpu-check-")
    if args.smoke:
        args.budget_s = max(args.budget_s, 1800)  # a shared CPU: no budget cuts, every stage runs
    signal.signal(signal.SIGTERM, _terminate)  # `timeout` in gpu_check.sh: stop the running stage, keep the JSON
    check = Check(args, math_args)
    check.log(f"work directory {check.work}; results {check.out}; data {check.data_dir}")
    for name in stages:
        check.run_stage(name)
    check.save()
    print(json.dumps(check.result["summary"], indent=2))
    print(f"wrote {check.out}")


if __name__ == "__main__":
    main()
