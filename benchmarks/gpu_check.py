"""One-card performance check: WRN-28-10 TRADES training and EDM sampling, fp32 against bf16.

Measures on one GPU (sized for an H100/H200 in under 8 minutes):

1. the card's dense bf16 peak, from a large bf16 matmul;
2. WRN-28-10 TRADES (β = 5, K = 10, ℓ∞ 8/255) on synthetic 32×32×3 batches of 512: images/s in
   fp32 and under bf16 autocast, eager and ``torch.compile``d, peak memory, and the fraction of the
   bf16 peak reached (docs/performance.md: 27 forward-equivalents × 5.24 GMAC × 2 FLOP per image). A config
   ending in ``+fmnist`` runs the same step on 28×28×1 batches (a 1-channel WRN): the bare-step
   figure that ``gpu_pipeline.py`` compares robustdiff-train's end-to-end Fashion-MNIST rate with;
3. EDM CIFAR-10 DDPM++ (random weights) with the 18-step Heun sampler: images/s in fp32, bf16 and fp16,
   and the largest pixel difference between each reduced precision and fp32.

Everything runs from the repository (``PYTHONPATH=src``); nothing is downloaded. Results are
written to ``$OUT/gpu_check.json`` (or ``--out``) after every measurement, so a run cut short
still leaves what it measured. Compiled configurations go last and are skipped once the time
budget is spent.

    bash benchmarks/gpu_check.sh                 # on the GPU machine
    python benchmarks/gpu_check.py --smoke       # CPU, tiny sizes, seconds: checks the script runs
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
import traceback
from pathlib import Path

import torch
import torch._dynamo
from torch import nn

from robustdiff.adversarial.trades import AttackConfig, trades_loss
from robustdiff.data.datasets import get_info
from robustdiff.diffusion.edm import EDMPrecond, to_uint8
from robustdiff.diffusion.sampler import edm_sampler
from robustdiff.models.unet import unet_preset
from robustdiff.models.wrn import bn_parameter_names, build_wrn
from robustdiff.training.ema import EMA
from robustdiff.utils.hardware import allow_graphs
from robustdiff.utils.io import atomic_write_text

FORWARD_EQUIVALENTS = 27  # p_nat forward, K × (forward + input backward), 2 forwards + full backward
WRN_28_10_GMAC = 5.24  # per 32×32 image


class Clock:
    def __init__(self, device: torch.device):
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def now(self) -> float:
        self.sync()
        return time.perf_counter()


def count_macs(model: nn.Module, shape: tuple[int, ...], device) -> float:
    """Multiply-accumulates of one forward (convolutions and linear layers), from forward hooks."""
    total = [0]

    def conv_hook(m: nn.Conv2d, inp, out):
        total[0] += out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]

    def linear_hook(m: nn.Linear, inp, out):
        total[0] += out.numel() * m.in_features

    hooks = [m.register_forward_hook(conv_hook if isinstance(m, nn.Conv2d) else linear_hook)
             for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(torch.zeros(shape, device=device))
    model.train(was_training)
    for h in hooks:
        h.remove()
    return total[0] / shape[0]


def bf16_peak(device: torch.device, n: int, iters: int) -> float:
    """Dense bf16 matmul FLOP/s (n×n @ n×n)."""
    clock = Clock(device)
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start = clock.now()
    for _ in range(iters):
        a @ b
    return 2 * n**3 * iters / (clock.now() - start)


def trades_throughput(init: nn.Module, args, device, precision: str, compile_model: bool,
                      channels_last: bool, image_shape: tuple[int, int, int] = (3, 32, 32)) -> dict:
    """One configuration of the bare TRADES step. image_shape: (C, H, W) of the synthetic batches."""
    clock = Clock(device)
    model = copy.deepcopy(init).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    no_decay = bn_parameter_names(model)
    opt = torch.optim.SGD([{"params": [p for n, p in model.named_parameters() if n not in no_decay], "weight_decay": 5e-4},
                           {"params": [p for n, p in model.named_parameters() if n in no_decay], "weight_decay": 0.0}],
                          lr=0.1, momentum=0.9, nesterov=True)
    ema = EMA(model)
    if compile_model:
        # Each configuration compiles afresh: WideResNet.forward's graph cache is shared by every instance, and
        # three compiled configurations × 3 graphs would pass dynamo's limit of 8 and silently run eager.
        torch._dynamo.reset()
        allow_graphs(16)
    net = torch.compile(model) if compile_model else model
    cfg = AttackConfig("linf", 8 / 255, 2 / 255, args.steps)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.rand(args.batch, *image_shape, device=device, generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (args.batch,), device=device, generator=g)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16"
                else torch.autocast(device.type, enabled=False))

    def step() -> torch.Tensor:
        with autocast:
            out = trades_loss(net, x, y, cfg, beta=args.beta, label_smoothing=0.1, generator=g)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        ema.update(model)
        return out.loss.detach()

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    start = clock.now()
    for _ in range(args.warmup):
        step()
    warmup_s = clock.now() - start
    start = clock.now()
    for _ in range(args.iters):
        loss = step()
    elapsed = clock.now() - start
    ips = args.batch * args.iters / elapsed
    return {
        "images_per_s": ips, "s_per_step": elapsed / args.iters, "warmup_s": warmup_s,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "loss": float(loss),
    }


def build_edm(args, device) -> EDMPrecond:
    torch.manual_seed(0)
    kwargs = unet_preset(args.edm_preset, 32)
    kwargs["augment_dim"] = 9  # EDM's CIFAR-10 networks are trained with augmentation conditioning
    net = EDMPrecond(32, 3, label_dim=10, **kwargs)
    with torch.no_grad():  # layers EDM initialises at 1e-5 get a normal scale, so the output is not trivial
        for name, p in net.named_parameters():
            if name.endswith(("conv1.weight", "proj.weight", "aux_conv.weight")):
                p.mul_(1e5)
    return net.to(device).eval()


def edm_throughput(net, args, device, autocast_dtype) -> tuple[dict, torch.Tensor]:
    clock = Clock(device)
    g = torch.Generator(device=device).manual_seed(0)
    latents = torch.randn(args.edm_batch, 3, 32, 32, device=device, generator=g)
    labels = torch.arange(args.edm_batch, device=device) % 10
    edm_sampler(net, latents[:2], labels[:2], num_steps=1, autocast_dtype=autocast_dtype)  # warm-up
    start = clock.now()
    x = edm_sampler(net, latents, labels, num_steps=args.edm_steps, autocast_dtype=autocast_dtype)
    elapsed = clock.now() - start
    return {"images_per_s": args.edm_batch / elapsed, "s_per_batch": elapsed}, x


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU-sized: WRN-10-1, batch 8, small UNet, seconds")
    p.add_argument("--device", default=None)
    p.add_argument("--model", default="wrn-28-10")
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--steps", type=int, default=10, help="TRADES attack steps K")
    p.add_argument("--beta", type=float, default=5.0)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=6, help="timed optimiser steps per configuration")
    p.add_argument("--configs", default="fp32,bf16,bf16+cl,bf16+cl+fmnist,bf16+cl+compile,bf16+cl+compile+fmnist",
                   help="comma list of precision[+cl (channels_last)][+compile][+fmnist (28×28×1 batches)]")
    p.add_argument("--matmul", type=int, default=8192, help="side of the bf16 peak matmul")
    p.add_argument("--edm-preset", default="ddpmpp")
    p.add_argument("--edm-batch", type=int, default=256)
    p.add_argument("--edm-steps", type=int, default=18)
    p.add_argument("--budget-s", type=float, default=420, help="no new compiled configuration starts after this")
    p.add_argument("--no-tf32", action="store_true", help="fp32 convolutions without TF32 (PyTorch's default allows it)")
    p.add_argument("--out", default=None, help="JSON path (default $OUT/gpu_check.json when $OUT is set)")
    args = p.parse_args()
    if args.smoke:
        args.model, args.batch, args.steps, args.warmup, args.iters = "wrn-10-1", 8, 2, 1, 1
        args.matmul, args.edm_preset, args.edm_batch, args.edm_steps = 256, "small", 2, 3
        if args.configs == p.get_default("configs"):
            args.configs = "fp32,bf16,bf16+cl+fmnist"
        torch.set_num_threads(1)  # a shared CPU: OpenMP threads spin-waiting on each other cost more than they give
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.smoke else "cpu"))
    out_path = Path(args.out) if args.out else (Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT") else None)
    began = time.perf_counter()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.allow_tf32 = not args.no_tf32

    result: dict = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "cuda": torch.version.cuda, "args": vars(args),
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32, "matmul_fp32_precision": torch.get_float32_matmul_precision(),
        "trades": {}, "edm": {},
    }

    def save() -> None:
        result["elapsed_s"] = time.perf_counter() - began
        if out_path is not None:
            out_path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(out_path, json.dumps(result, indent=2))  # a run cut mid-write keeps the last JSON

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - began:6.1f} s] {msg}", flush=True)

    result["bf16_peak_tflops"] = bf16_peak(device, args.matmul, 50 if device.type == "cuda" else 3) / 1e12
    log(f"{result['device']}: bf16 matmul {args.matmul}³: {result['bf16_peak_tflops']:.1f} TFLOP/s")
    save()

    torch.manual_seed(0)
    init = build_wrn(args.model, num_classes=10, in_channels=3)
    result["wrn_gmac_per_image"] = count_macs(init, (1, 3, 32, 32), "cpu") / 1e9
    log(f"{args.model}: {result['wrn_gmac_per_image']:.3f} GMAC per 32×32 forward (5.24 for wrn-28-10)")
    flop_per_image = FORWARD_EQUIVALENTS * WRN_28_10_GMAC * 1e9 * 2 if args.model == "wrn-28-10" else \
        FORWARD_EQUIVALENTS * result["wrn_gmac_per_image"] * 1e9 * 2
    torch.manual_seed(0)
    info = get_info("fashionmnist")
    init_fmnist = build_wrn(args.model, num_classes=10, in_channels=1, mean=info.mean, std=info.std)
    result["wrn_gmac_per_image_fmnist"] = count_macs(init_fmnist, (1, 1, 28, 28), "cpu") / 1e9
    flop_per_image_fmnist = FORWARD_EQUIVALENTS * result["wrn_gmac_per_image_fmnist"] * 1e9 * 2

    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    eager = [c for c in configs if "compile" not in c]
    compiled = [c for c in configs if "compile" in c]

    def run_trades(name: str) -> None:
        parts = name.split("+")
        precision = parts[0]
        fmnist = "fmnist" in parts
        try:
            r = trades_throughput(init_fmnist if fmnist else init, args, device, precision, "compile" in parts,
                                  "cl" in parts, (1, 28, 28) if fmnist else (3, 32, 32))
            flop = flop_per_image_fmnist if fmnist else flop_per_image
            r["fraction_of_bf16_peak"] = r["images_per_s"] * flop / (result["bf16_peak_tflops"] * 1e12)
            mem = f", peak {r['peak_memory_gib']:.1f} GiB" if r["peak_memory_gib"] is not None else ""
            log(f"TRADES {name}: {r['images_per_s']:.0f} img/s ({r['fraction_of_bf16_peak']:.1%} of bf16 peak)"
                f"{mem}, warm-up {r['warmup_s']:.0f} s")
        except Exception as e:  # a failed configuration (e.g. no compiler) must not lose the others
            traceback.print_exc()
            r = {"error": f"{type(e).__name__}: {e}"}
            log(f"TRADES {name}: failed: {r['error']}")
        result["trades"][name] = r
        save()

    for name in eager:
        run_trades(name)

    # EDM before the compiled configurations: compilation time is the part that can run long.
    try:
        net = build_edm(args, device)
        r32, x32 = edm_throughput(net, args, device, None)
        r16, x16 = edm_throughput(net, args, device, torch.bfloat16)
        dpix = (to_uint8(x32).int() - to_uint8(x16).int()).abs()
        result["edm"] = {"preset": args.edm_preset, "steps": args.edm_steps, "nfe": 2 * args.edm_steps - 1,
                         "batch": args.edm_batch, "fp32": r32, "bf16": r16,
                         "max_abs_dpixel_uint8": int(dpix.max()), "mean_abs_dpixel_uint8": float(dpix.float().mean()),
                         "max_abs_dx": float((x32 - x16).abs().max())}
        log(f"EDM {args.edm_preset} {args.edm_steps} steps: fp32 {r32['images_per_s']:.0f} img/s, "
            f"bf16 {r16['images_per_s']:.0f} img/s, max |Δpixel| {int(dpix.max())}/255")
        save()
        rh, xh = edm_throughput(net, args, device, torch.float16)
        dpix_h = (to_uint8(x32).int() - to_uint8(xh).int()).abs()
        result["edm"].update(fp16=rh, fp16_max_abs_dpixel_uint8=int(dpix_h.max()),
                             fp16_mean_abs_dpixel_uint8=float(dpix_h.float().mean()))
        log(f"EDM fp16: {rh['images_per_s']:.0f} img/s, max |Δpixel| {int(dpix_h.max())}/255")
        del net
    except Exception as e:
        traceback.print_exc()
        result["edm"] = {"error": f"{type(e).__name__}: {e}"}
    save()

    for name in compiled:
        if time.perf_counter() - began > args.budget_s:
            result["trades"][name] = {"skipped": f"time budget {args.budget_s:g} s spent"}
            log(f"TRADES {name}: skipped (budget)")
            save()
            continue
        run_trades(name)

    print_table(result, args, flop_per_image)
    save()
    if out_path is not None:
        print(f"wrote {out_path}")


def print_table(result: dict, args, flop_per_image: float) -> None:
    print(f"\n{result['device']}, torch {result['torch']}, bf16 peak {result['bf16_peak_tflops']:.1f} TFLOP/s "
          f"(matmul {args.matmul}), cudnn TF32 {result['cudnn_allow_tf32']}")
    print(f"{args.model} TRADES-{args.steps} β={args.beta:g}, batch {args.batch}, 32×32×3 synthetic; "
          f"{flop_per_image / 1e12:.3f} TFLOP per image")
    print(f"{'config':<18} {'img/s':>8} {'s/step':>8} {'% bf16 peak':>12} {'peak GiB':>9} {'vs fp32':>8}")
    base = result["trades"].get("fp32", {}).get("images_per_s")
    for name, r in result["trades"].items():
        if "images_per_s" not in r:
            print(f"{name:<18} {r.get('error') or r.get('skipped')}")
            continue
        mem = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] is not None else "-"
        rel = f"{r['images_per_s'] / base:.2f}×" if base else "-"
        print(f"{name:<18} {r['images_per_s']:>8.1f} {r['s_per_step']:>8.3f} {r['fraction_of_bf16_peak'] * 100:>11.1f}% "
              f"{mem:>9} {rel:>8}")
    e = result["edm"]
    if "fp32" in e:
        print(f"EDM {e['preset']} cond. 32×32, {e['steps']} steps ({e['nfe']} NFE), batch {e['batch']}: "
              f"fp32 {e['fp32']['images_per_s']:.1f} img/s, bf16 {e['bf16']['images_per_s']:.1f} img/s "
              f"({e['bf16']['images_per_s'] / e['fp32']['images_per_s']:.2f}×); max |Δpixel| fp32 vs bf16 "
              f"{e['max_abs_dpixel_uint8']}/255 (mean {e['mean_abs_dpixel_uint8']:.2f})")
        if "fp16" in e:
            print(f"EDM fp16: {e['fp16']['images_per_s']:.1f} img/s "
                  f"({e['fp16']['images_per_s'] / e['fp32']['images_per_s']:.2f}× fp32); max |Δpixel| "
                  f"{e['fp16_max_abs_dpixel_uint8']}/255 (mean {e['fp16_mean_abs_dpixel_uint8']:.2f})")
    elif e:
        print(f"EDM: {e.get('error')}")


if __name__ == "__main__":
    main()
