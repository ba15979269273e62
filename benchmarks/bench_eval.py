"""AutoAttack throughput (points/s) at batch 128 against a larger batch.

A small WideResNet is first trained for a few TRADES steps on Fashion-MNIST, then every batch size
attacks the same test points with the same seed. Throughput, not accuracy, is measured here: by
default the labels are the model's own predictions and ε is 2/255, so that most points stay robust
long enough for every attack to see more than one batch (with true labels, a weak model leaves too
few points after APGD-CE for the batch size to matter). Robust accuracy differs between batch sizes
only through which points share a batch (pyautoattack re-seeds per batch); it is printed.

    python benchmarks/bench_eval.py                      # CPU: APGD-CE only, about a minute
    python benchmarks/bench_eval.py --device cuda --model wrn-28-10 --n 1024 --batch-sizes 128,512

Full standard AutoAttack on CPU takes minutes even for 64 points (APGD-T and FAB-T: 900 iterations
per batch, Square: 5000 queries), so on CPU the default is APGD-CE alone; on CUDA, all four.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from robustdiff.adversarial.trades import AttackConfig, trades_loss
from robustdiff.data.datasets import get_info, load_split
from robustdiff.evaluation.autoattack import STANDARD_ATTACKS, evaluate_autoattack
from robustdiff.models.wrn import build_wrn


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default="wrn-10-1")
    p.add_argument("--dataset", default="fashionmnist")
    p.add_argument("--n", type=int, default=256, help="test points attacked")
    p.add_argument("--batch-sizes", default="128,256")
    p.add_argument("--attacks", default=None,
                   help="comma list, or 'standard' for all four (default: standard on cuda, apgd-ce on cpu)")
    p.add_argument("--train-steps", type=int, default=20)
    p.add_argument("--eps", type=float, default=2 / 255)
    p.add_argument("--labels", choices=("predicted", "true"), default="predicted")
    # One thread: a tiny model gains little from two, and on a shared CPU OpenMP threads wait on each other.
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.attacks is None:
        args.attacks = "standard" if device.type == "cuda" else "apgd-ce"
    attacks = list(STANDARD_ATTACKS) if args.attacks == "standard" else args.attacks.split(",")
    info = get_info(args.dataset)
    torch.manual_seed(0)
    model = build_wrn(args.model, num_classes=info.num_classes, in_channels=info.image_shape[2],
                      mean=info.mean, std=info.std).to(device)

    images, labels = load_split(args.dataset, "train")
    x_train = torch.from_numpy(images[1024 : 1024 + 64 * args.train_steps]).to(device).permute(0, 3, 1, 2).float() / 255
    y_train = torch.from_numpy(labels[1024 : 1024 + 64 * args.train_steps]).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    started = time.time()
    model.train()
    for i in range(args.train_steps):
        xb, yb = x_train[i * 64 : (i + 1) * 64], y_train[i * 64 : (i + 1) * 64]
        loss = trades_loss(model, xb, yb, AttackConfig("linf", 8 / 255, 2 / 255, 3)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    print(f"trained {args.model} for {args.train_steps} TRADES steps in {time.time() - started:.1f} s")

    images, labels = load_split(args.dataset, "test")
    x = torch.from_numpy(images[: args.n]).to(device).permute(0, 3, 1, 2).float() / 255
    y = torch.from_numpy(labels[: args.n]).to(device)
    if args.labels == "predicted":
        with torch.no_grad():
            y = model(x).argmax(1)
    rows = []
    for bs in [int(b) for b in args.batch_sizes.split(",")]:
        if device.type == "cuda":
            torch.cuda.synchronize()
        r = evaluate_autoattack(model, x, y, norm="linf", eps=args.eps, batch_size=bs, seed=0, attacks=attacks)
        rows.append({"batch_size": bs, "seconds": r["seconds"], "points_per_s": args.n / r["seconds"],
                     "clean": r["clean_acc"], "robust": r["robust_acc"], "attack_seconds": r["attack_seconds"]})
        per = ", ".join(f"{k} {v:.1f}s" for k, v in r["attack_seconds"].items())
        print(f"batch {bs:5d}: {r['seconds']:7.1f} s  {args.n / r['seconds']:7.2f} points/s  clean "
              f"{100 * r['clean_acc']:.2f}%  robust {100 * r['robust_acc']:.2f}%  ({per})", flush=True)
    print(f"{'+'.join(attacks)} on {args.n} points, eps {args.eps:.4f}, {args.labels} labels, {args.model}, "
          f"{args.device}, {torch.get_num_threads()} threads")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
