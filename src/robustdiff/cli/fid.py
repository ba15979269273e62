"""robustdiff-fid: measure a generator's data — FID (EDM's definition), classifier FD and label agreement.

    # reference statistics of real images (EDM's fid-refs .npz layout: mu, sigma)
    robustdiff-fid ref --dataset cifar10 --split train --features inception --inception-weights W.pth --out c10.npz
    robustdiff-fid ref --dataset fashionmnist --split test --features classifier --classifier runs/clf --out ref.npz
    # a store's first N images against them; the result is recorded in the store's manifest
    robustdiff-fid score data/generated/cifar10-1m --ref c10.npz --features inception --inception-weights W.pth
    robustdiff-fid score runs/gen/store --ref ref.npz --features classifier --classifier runs/clf --n-examples 10000

FID = Inception-v3 pool3 features of 50,000 generated images (``--n-examples``) against the training set's statistics;
EDM's published ``cifar10-32x32.npz`` reference works as ``--ref``. Classifier FD uses the penultimate
features of a WideResNet trained by robustdiff on the real data (``robustdiff-train loss=ce ...``): it works
offline for every dataset and ranks generators measured with the same classifier. With ``--classifier`` the
score also reports label agreement (the classifier's accuracy against the generating labels).
Exit status: 0 done, 1 bad input or data, 2 usage error.
"""

from __future__ import annotations

import argparse
import sys

from .common import add_subcommand, argument_parser


def build_parser() -> argparse.ArgumentParser:
    p = argument_parser("robustdiff-fid", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    sub = p.add_subparsers(dest="command", required=True)

    def features(q: argparse.ArgumentParser) -> None:
        q.add_argument("--features", choices=("inception", "classifier"), default="classifier",
                       help="inception: FID (needs the Inception weights file); classifier: classifier FD (default)")
        q.add_argument("--classifier", default=None,
                       help="robustdiff-train run directory or WideResNet state dict (classifier FD, label agreement)")
        q.add_argument("--inception-weights", default=None,
                       help="torch-fidelity's weights-inception-2015-12-05-6726825d.pth (default: torch.hub's cache)")
        q.add_argument("--batch-size", type=int, default=500)
        q.add_argument("--device", default="auto", help="auto (default: the GPU when there is one), cpu, gpu, cuda, cuda:1, ...")
        q.add_argument("--no-progress", action="store_true")

    ref = add_subcommand(sub, "ref", help="reference statistics (mu, sigma) of a dataset split")
    ref.add_argument("--dataset", required=True)
    ref.add_argument("--split", choices=("train", "test"), default="train")
    ref.add_argument("--start", type=int, default=0, help="first image of the split (default 0)")
    ref.add_argument("--count", type=int, default=None, help="images from --start (default: to the end)")
    ref.add_argument("--data-dir", default="data")
    ref.add_argument("--out", required=True, help=".npz to write (mu, sigma, n, meta)")
    ref.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    features(ref)

    score = add_subcommand(sub, "score", help="FD (and label agreement) of a generated store against a reference")
    score.add_argument("store")
    score.add_argument("--ref", required=True, help="reference statistics .npz (robustdiff-fid ref, or EDM's)")
    score.add_argument("--n-examples", "--n", dest="n", type=int, default=50_000,
                       help="first N images of the store (default 50,000, as EDM; --n is its short form)")
    score.add_argument("--no-record", action="store_true", help="do not record the result in the store's manifest")
    score.add_argument("--json", dest="json_out", default=None, help="also write the result to this JSON file")
    features(score)
    return p


def run_ref(args: argparse.Namespace) -> dict:
    from ..data.datasets import get_info, load_split
    from ..data.store import check_new_file
    from ..evaluation.features import feature_extractor
    from ..evaluation.frechet import QualityError, compute_statistics, save_statistics
    from ..evaluation.generative import batches_of

    out = check_new_file(args.out, args.overwrite, what="--out")  # before any feature is computed
    info = get_info(args.dataset)
    extractor, meta, _ = feature_extractor(args.features, inception_weights=args.inception_weights,
                                           classifier=args.classifier, dataset=info.name,
                                           num_classes=info.num_classes, channels=info.image_shape[2])
    images, _ = load_split(info.name, args.split, args.data_dir)
    stop = len(images) if args.count is None else args.start + args.count
    if not 0 <= args.start < stop <= len(images):
        raise QualityError(f"--start {args.start} --count {args.count}: outside the {len(images):,} images of "
                           f"{info.name} {args.split}")
    images = images[args.start:stop]
    meta["source"] = f"{info.name}:{args.split}[{args.start}:{stop}]"
    stats = compute_statistics(extractor, batches_of(images, None, args.batch_size), device=args.device, meta=meta,
                               progress=not args.no_progress, total=len(images))
    save_statistics(out, stats)
    print(f"robustdiff-fid: {out}: {args.features} statistics of {stats.n:,} images ({meta['source']})")
    return {"out": str(out), "n": stats.n, **meta}


def run_score(args: argparse.Namespace) -> dict:
    from ..data.store import check_new_file
    from ..evaluation.generative import score_store
    from ..utils.io import atomic_write_json

    if args.json_out:
        check_new_file(args.json_out, overwrite=True, what="--json")  # its directory, before the scoring
    result = score_store(args.store, args.ref, features=args.features, classifier=args.classifier,
                         inception_weights=args.inception_weights, n=args.n, batch_size=args.batch_size,
                         device=args.device, record=not args.no_record, progress=not args.no_progress)
    name = "FID" if result["metric"] == "fid" else "classifier FD"
    line = f"robustdiff-fid: {args.store}: {name} {result['value']:.4f} on {result['n']:,} images"
    if result["n"] < (args.n or 0):
        line += f" (the store holds only {result['n']:,} of the {args.n:,} asked for; FIDs on fewer images read higher)"
    if "label_agreement" in result:
        line += f"; label agreement {100 * result['label_agreement']:.2f}%"
    print(line)
    if args.json_out:
        atomic_write_json(args.json_out, result)
    return result


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from ..data.datasets import DatasetError
    from ..data.store import StoreError
    from ..evaluation.frechet import QualityError

    try:
        (run_ref if args.command == "ref" else run_score)(args)
    except (QualityError, StoreError, DatasetError, ValueError) as e:
        print(f"robustdiff-fid: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
