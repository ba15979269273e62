"""EDM throughput on this machine: sampling (fp32 vs bf16 autocast) and training, for a SongUNet preset.

    python benchmarks/bench_edm.py [--preset small] [--resolution 28] [--channels 1] [--steps 18]
                                   [--batch 64] [--threads N] [--device cpu] [--compile] [--out edm.json]

Sampling runs the way ``robustdiff-generate`` runs it (float64 Heun solver state, the network in fp32 or
under bf16 autocast); ``--compile`` adds a row with the U-Net compiled (bf16).

Weights are random, but the layers EDM initialises at 1e-5 (conv1, proj, aux_conv) are rescaled to a
normal init so the network output — and therefore the fp32/bf16 difference — is not trivially zero.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import numpy as np
import torch

from robustdiff.diffusion.augment import AUGMENT_DIM, AugmentPipe
from robustdiff.diffusion.edm import EDMPrecond, edm_loss
from robustdiff.diffusion.sampler import sample_images
from robustdiff.models.unet import unet_preset


def build(args) -> EDMPrecond:
    torch.manual_seed(0)
    kwargs = unet_preset(args.preset, args.resolution)
    kwargs["augment_dim"] = AUGMENT_DIM
    net = EDMPrecond(args.resolution, args.channels, label_dim=10, **kwargs)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith(("conv1.weight", "proj.weight", "aux_conv.weight")):
                p.mul_(1e5)
    return net.to(args.device)


def bench_sampling(net, args, autocast_dtype):
    indices = list(range(args.batch))
    sample_images(net, indices[:2], 10, seed=0, num_steps=2, batch_size=2, autocast_dtype=autocast_dtype)  # warm-up
    start = time.perf_counter()
    images, _ = sample_images(net, indices, 10, seed=0, num_steps=args.steps, batch_size=args.batch,
                              autocast_dtype=autocast_dtype)
    return images, args.batch / (time.perf_counter() - start)


def bench_training(net, args):
    net.train()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    augment = AugmentPipe()
    images = torch.rand(args.batch, args.channels, args.resolution, args.resolution, device=args.device) * 2 - 1
    labels = torch.arange(args.batch, device=args.device) % 10

    def step():
        loss = edm_loss(net, images, labels, augment_pipe=augment)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up
    start = time.perf_counter()
    for _ in range(args.train_iters):
        step()
    net.eval()
    return args.train_iters * args.batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--resolution", type=int, default=28)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--steps", type=int, default=18)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--train-iters", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compile", action="store_true", help="also time bf16 sampling with the U-Net compiled")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    net = build(args).eval()
    params = sum(p.numel() for p in net.parameters())
    img32, rate32 = bench_sampling(net, args, None)
    img16, rate16 = bench_sampling(net, args, torch.bfloat16)
    diff = np.abs(img32.astype(np.int16) - img16.astype(np.int16))
    rate_compiled = diff_compiled = None
    if args.compile:
        compiled = copy.deepcopy(net)
        compiled.model = torch.compile(compiled.model, dynamic=False)
        sample_images(compiled, list(range(args.batch)), 10, seed=0, num_steps=2, batch_size=args.batch,
                      autocast_dtype=torch.bfloat16)  # compile at the timed batch size
        img_c, rate_compiled = bench_sampling(compiled, args, torch.bfloat16)
        diff_compiled = int(np.abs(img_c.astype(np.int16) - img16.astype(np.int16)).max())
    train_rate = bench_training(net, args)

    nfe = 2 * args.steps - 1
    print(f"EDM bench: preset {args.preset}, {args.resolution}x{args.resolution}x{args.channels}, "
          f"{params:,} params, batch {args.batch}, device {args.device}, threads {torch.get_num_threads()}")
    print(f"{'measurement':<38} {'value':>12}")
    print(f"{'sampling fp32 (img/s, ' + str(args.steps) + ' steps, ' + str(nfe) + ' NFE)':<38} {rate32:>12.2f}")
    print(f"{'sampling bf16 autocast (img/s)':<38} {rate16:>12.2f}")
    print(f"{'fp32 vs bf16: max |Δpixel| (uint8)':<38} {int(diff.max()):>12d}")
    print(f"{'fp32 vs bf16: mean |Δpixel| (uint8)':<38} {float(diff.mean()):>12.3f}")
    print(f"{'sampling bf16 / fp32':<38} {rate16 / rate32:>12.2f}")
    if rate_compiled is not None:
        print(f"{'sampling bf16 + compile (img/s)':<38} {rate_compiled:>12.2f}")
        print(f"{'compile vs eager bf16: max |Δpixel|':<38} {diff_compiled:>12d}")
    print(f"{'training fwd+bwd+Adam (img/s)':<38} {train_rate:>12.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "params": params, "sampling_fp32_img_s": rate32,
                       "sampling_bf16_img_s": rate16, "bf16_over_fp32": rate16 / rate32,
                       "max_abs_pixel_diff": int(diff.max()), "mean_abs_pixel_diff": float(diff.mean()),
                       "sampling_bf16_compiled_img_s": rate_compiled, "compiled_max_abs_pixel_diff": diff_compiled,
                       "training_img_s": train_rate}, f, indent=2)


if __name__ == "__main__":
    main()
