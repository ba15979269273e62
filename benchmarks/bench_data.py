"""Generated-data input pipeline: our sharded store vs the reference's whole-.npz-in-RAM loading.

    python benchmarks/bench_data.py                 # 1,000,000 CIFAR-shaped images (needs ~10 GB of disk)
    python benchmarks/bench_data.py --n 200000      # smaller

In one run, on the same synthetic 32×32×3 data:
  build   our store (StoreWriter, chunk by chunk) and a reference-style .npz (array in RAM, np.savez)
  import  import_npz of that .npz into a second store (checked shard-for-shard against the first)
  ours    MixedBatchPlan + GeneratedStore.get + a 50k real set in RAM → concatenate → float [0, 1]
          → random crop (pad 4) + h-flip as batch tensor ops, in the main process
  ref     np.load the whole .npz, np.concatenate with the real set, a Dataset doing per-image PIL
          RandomCrop(32, 4) + RandomHorizontalFlip + ToTensor, DataLoader with 2 workers, and the
          reference sampler (real chunk of a permutation + torch.randint generated draws, shuffled)
Every phase runs in its own subprocess, so its peak RSS (VmHWM; workers separately) is its own.
The files sit in the page cache after building, for both pipelines alike. Everything is written to
a temporary directory that is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SHAPE = (32, 32, 3)
NUM_CLASSES = 10
N_REAL = 50_000
GEN_CHUNK = 10_000


# ---------------------------------------------------------------------------------------------
# helpers


def peak_rss_mib() -> float:
    """This process's peak resident set (VmHWM), MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def rss_mib() -> float:
    """This process's current resident set (VmRSS), MiB: taken after imports as the baseline."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def anon_rss_mib() -> float:
    """This process's current anonymous (non-file-backed) resident memory, MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def children_peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def synthetic_chunk(start: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic synthetic images [start, start + n): the same bytes however they are chunked."""
    block = start // GEN_CHUNK
    assert start % GEN_CHUNK == 0 and n <= GEN_CHUNK
    rng = np.random.default_rng([1234, block])
    images = np.frombuffer(rng.bytes(n * int(np.prod(SHAPE))), dtype=np.uint8).reshape(n, *SHAPE)
    labels = rng.integers(0, NUM_CLASSES, n)
    return images, labels


def real_set() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(99)
    return rng.integers(0, 256, (N_REAL, *SHAPE), dtype=np.uint8), rng.integers(0, NUM_CLASSES, N_REAL)


def result(**kw) -> None:
    kw["baseline_rss_mib"] = BASELINE
    print("RESULT " + json.dumps(kw), flush=True)


BASELINE = float("nan")


def baseline() -> None:
    """Record the RSS after the imports (torch alone is a few hundred MiB)."""
    global BASELINE
    BASELINE = rss_mib()


# ---------------------------------------------------------------------------------------------
# phases (each in its own subprocess)


def phase_build_store(a) -> None:
    from robustdiff.data.store import StoreWriter

    baseline()
    t = time.perf_counter()
    with StoreWriter(a.store, SHAPE, NUM_CLASSES, provenance={"generator": "bench_data synthetic"}) as w:
        for start in range(0, a.n, GEN_CHUNK):
            w.append(*synthetic_chunk(start, min(GEN_CHUNK, a.n - start)))
    result(seconds=time.perf_counter() - t, peak_rss_mib=peak_rss_mib())


def phase_build_npz(a) -> None:
    baseline()
    t = time.perf_counter()
    images = np.empty((a.n, *SHAPE), np.uint8)
    labels = np.empty(a.n, np.int64)
    for start in range(0, a.n, GEN_CHUNK):
        x, y = synthetic_chunk(start, min(GEN_CHUNK, a.n - start))
        images[start : start + len(y)] = x
        labels[start : start + len(y)] = y
    np.savez(a.npz, image=images, label=labels)
    result(seconds=time.perf_counter() - t, peak_rss_mib=peak_rss_mib())


def phase_import(a) -> None:
    from robustdiff.data.store import GeneratedStore, import_npz

    baseline()
    t = time.perf_counter()
    m = import_npz([a.npz], a.imported, progress=False)
    seconds = time.perf_counter() - t
    built = GeneratedStore(a.store).manifest["shards"]
    same = [s["images_sha256"] for s in m["shards"]] == [s["images_sha256"] for s in built]
    result(seconds=seconds, peak_rss_mib=peak_rss_mib(), identical=same)


def _plan(n_generated: int, a):
    from robustdiff.data.mixing import MixedBatchPlan

    return MixedBatchPlan(N_REAL, n_generated, a.batch, a.ratio, math.ceil(N_REAL / a.batch), seed=0)


def phase_ours(a) -> None:
    import torch

    torch.set_num_threads(1)  # one core for the pipeline, like one loader process
    try:
        from robustdiff.data.augment import augment_images

        def augment(x_uint8: torch.Tensor, g: torch.Generator) -> torch.Tensor:
            return augment_images(x_uint8, "crop_flip", padding=4, generator=g)  # what the training step runs
    except ImportError:  # stand-in until robustdiff.data.augment exists
        import torch.nn.functional as F

        def augment(x_uint8: torch.Tensor, g: torch.Generator) -> torch.Tensor:
            x = x_uint8.permute(0, 3, 1, 2).float().div_(255)
            b, c, h, w = x.shape
            p = F.pad(x, (4, 4, 4, 4))
            oy = torch.randint(0, 9, (b,), generator=g)[:, None, None, None]
            ox = torch.randint(0, 9, (b,), generator=g)[:, None, None, None]
            rows = oy + torch.arange(h)[None, None, :, None]
            cols = ox + torch.arange(w)[None, None, None, :]
            x = p[torch.arange(b)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]
            flip = torch.rand(b, generator=g) < 0.5
            return torch.where(flip[:, None, None, None], x.flip(3), x)

    from robustdiff.data.store import GeneratedStore

    baseline()
    real_x, real_y = real_set()
    g = torch.Generator().manual_seed(0)
    peak_anon = anon_rss_mib()
    t0 = time.perf_counter()
    store = GeneratedStore(a.store)
    plan = _plan(len(store), a)

    def batch(epoch: int, step: int):
        ri, gi = plan.global_batch(epoch, step)
        gx, gy = store.get(gi)
        x = torch.from_numpy(np.concatenate([real_x[ri], gx]))
        y = torch.from_numpy(np.concatenate([real_y[ri], gy]))
        return augment(x, g), y

    x, _ = batch(0, 0)
    first = time.perf_counter() - t0
    t = time.perf_counter()
    for i in range(1, a.batches + 1):
        e, s = divmod(i, plan.iterations_per_epoch)
        x, _ = batch(e, s)
        if i % 20 == 0:
            peak_anon = max(peak_anon, anon_rss_mib())
    elapsed = time.perf_counter() - t
    assert x.shape == (a.batch, 3, 32, 32) and x.dtype == torch.float32
    result(
        first_batch_s=first,
        images_per_s=a.batches * a.batch / elapsed,
        peak_rss_mib=peak_rss_mib(),
        peak_anon_mib=max(peak_anon, anon_rss_mib()),
        workers_peak_rss_mib=0.0,
    )


class _ReferenceDataset:
    """Per-image PIL augmentation, as torchvision datasets do it."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        import torchvision.transforms as T

        self.images, self.labels = images, labels
        self.transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor()])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


class _ReferenceSampler:
    """Per batch: the next chunk of a per-epoch permutation of the real indices, plus uniform
    with-replacement draws of generated indices (offset past the real ones), shuffled together."""

    def __init__(self, n_real: int, n_gen: int, batch: int, ratio: float, batches: int):
        import torch

        self.torch = torch
        self.n_real, self.n_gen, self.batches = n_real, n_gen, batches
        self.gen_per_batch = int(batch * (1 - ratio))
        self.real_per_batch = batch - self.gen_per_batch

    def __len__(self) -> int:
        return self.batches

    def __iter__(self):
        torch = self.torch
        done = 0
        while done < self.batches:
            perm = torch.randperm(self.n_real)
            for k in range(0, self.n_real - self.real_per_batch + 1, self.real_per_batch):
                real = perm[k : k + self.real_per_batch]
                gen = torch.randint(self.n_real, self.n_real + self.n_gen, (self.gen_per_batch,))
                b = torch.cat([real, gen])
                yield b[torch.randperm(len(b))].tolist()
                done += 1
                if done == self.batches:
                    return


def phase_reference(a) -> None:
    import PIL.Image  # noqa: F401
    import torch
    import torchvision.transforms  # noqa: F401

    torch.set_num_threads(1)
    baseline()
    peak_anon = anon_rss_mib()
    t0 = time.perf_counter()
    real_x, real_y = real_set()
    with np.load(a.npz) as z:
        gen_x, gen_y = z["image"], z["label"]
    images = np.concatenate([real_x, gen_x])
    labels = np.concatenate([real_y, gen_y])
    peak_anon = max(peak_anon, anon_rss_mib())
    del gen_x, gen_y
    loader = torch.utils.data.DataLoader(
        _ReferenceDataset(images, labels),
        batch_sampler=_ReferenceSampler(N_REAL, a.n, a.batch, a.ratio, a.batches + 1),
        num_workers=2,
    )
    it = iter(loader)
    x, _ = next(it)
    first = time.perf_counter() - t0
    t = time.perf_counter()
    for i, _batch in enumerate(it, start=1):
        if i % 20 == 0:
            peak_anon = max(peak_anon, anon_rss_mib())
    elapsed = time.perf_counter() - t
    assert x.shape == (a.batch, 3, 32, 32)
    del it, loader  # joins the workers, so RUSAGE_CHILDREN sees them
    result(
        first_batch_s=first,
        images_per_s=a.batches * a.batch / elapsed,
        peak_rss_mib=peak_rss_mib(),
        peak_anon_mib=peak_anon,
        workers_peak_rss_mib=children_peak_rss_mib(),
    )


PHASES = {
    "build-store": phase_build_store,
    "build-npz": phase_build_npz,
    "import": phase_import,
    "ours": phase_ours,
    "reference": phase_reference,
}


# ---------------------------------------------------------------------------------------------
# driver


def run_phase(name: str, a, paths: dict) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--phase",
        name,
        "--n",
        str(a.n),
        "--batch",
        str(a.batch),
        "--ratio",
        str(a.ratio),
        "--batches",
        str(a.batches),
    ]
    for k, v in paths.items():
        cmd += [f"--{k}", str(v)]
    print(f"[bench-data] {name} ...", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"[bench-data] phase {name} failed (exit {proc.returncode})")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT ") :])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000, help="generated images (default 1,000,000)")
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--ratio", type=float, default=0.3, help="fraction of real images per batch")
    p.add_argument("--batches", type=int, default=200, help="batches timed after the first")
    p.add_argument("--workdir", default=None, help="where the temporary directory goes (default: system tmp)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--phase", choices=sorted(PHASES), help=argparse.SUPPRESS)
    for k in ("store", "npz", "imported"):
        p.add_argument(f"--{k}", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.phase:
        PHASES[a.phase](a)
        return

    tmp = Path(tempfile.mkdtemp(prefix="bench-data-", dir=a.workdir))
    paths = {"store": tmp / "store", "npz": tmp / "generated.npz", "imported": tmp / "imported"}
    try:
        r = {
            name: run_phase(name, a, paths)
            for name in ("build-store", "build-npz", "import", "ours", "reference")
        }
        sizes = {
            "store_gib": sum(f.stat().st_size for f in paths["store"].iterdir()) / 2**30,
            "npz_gib": paths["npz"].stat().st_size / 2**30,
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    ours, ref = r["ours"], r["reference"]
    title = (
        f"bench-data: {a.n:,} generated {'×'.join(map(str, SHAPE))} images + {N_REAL:,} real, "
        f"batch {a.batch}, ratio {a.ratio}, {a.batches} timed batches, {os.cpu_count()} CPUs"
    )
    rows = [
        ("build (store | npz), s", r["build-store"]["seconds"], r["build-npz"]["seconds"]),
        ("build peak RSS, MiB", r["build-store"]["peak_rss_mib"], r["build-npz"]["peak_rss_mib"]),
        ("time to first batch, s", ours["first_batch_s"], ref["first_batch_s"]),
        ("throughput, images/s", ours["images_per_s"], ref["images_per_s"]),
        ("loader peak RSS (main), MiB", ours["peak_rss_mib"], ref["peak_rss_mib"]),
        ("loader peak anon RSS (main), MiB", ours["peak_anon_mib"], ref["peak_anon_mib"]),
        ("loader peak RSS (max worker), MiB", ours["workers_peak_rss_mib"], ref["workers_peak_rss_mib"]),
        ("loader RSS after imports, MiB", ours["baseline_rss_mib"], ref["baseline_rss_mib"]),
    ]
    print(title)
    print(f"{'':36} {'ours':>12} {'reference':>12} {'ref/ours':>9}")
    for label, o, f in rows:
        ratio = f"{f / o:9.2f}" if o else f"{'—':>9}"
        print(f"{label:36} {o:12,.2f} {f:12,.2f} {ratio}")
    imp = r["import"]
    print(
        f"import_npz of the .npz: {imp['seconds']:.1f} s, peak RSS {imp['peak_rss_mib']:,.0f} MiB "
        f"({imp['baseline_rss_mib']:,.0f} MiB after imports), "
        f"shards identical to the directly built store: {imp['identical']}"
    )
    print(
        f"build RSS after imports, MiB: store {r['build-store']['baseline_rss_mib']:,.0f}, "
        f"npz {r['build-npz']['baseline_rss_mib']:,.0f}"
    )
    print(f"on disk: store {sizes['store_gib']:.2f} GiB, npz {sizes['npz_gib']:.2f} GiB")
    if a.json:
        Path(a.json).write_text(
            json.dumps(
                {"args": vars(a) | {"phase": None}, "results": r, "sizes": sizes}, indent=2, default=str
            )
        )


if __name__ == "__main__":
    main()
