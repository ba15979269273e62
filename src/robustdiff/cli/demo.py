"""robustdiff-demo: the whole pipeline of the paper, shrunk to minutes on a CPU (Fashion-MNIST).

EDM, generated store, its quality, TRADES without and with it, AutoAttack and a report, under --out. The stages and their
directories are listed in robustdiff.pipeline.demo, which runs them; re-running the command finishes what an
interruption left and skips what is done. A demonstration, not a paper setting: `make study` shows what better
generators do.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

# torch, Lightning and the stages are imported when the demo runs: --help answers at once.
from ..pipeline.demo import DemoSettings
from ..utils.formatting import percent
from .common import argument_parser

_D = DemoSettings()  # the defaults


def build_parser() -> argparse.ArgumentParser:
    p = argument_parser("robustdiff-demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=_D.out, help="demo directory (default runs/demo)")
    p.add_argument("--data-dir", default=_D.data_dir, help="dataset directory (default: data, then Debian's location)")
    g = p.add_argument_group("generator")
    g.add_argument("--edm-kimg", type=float, default=_D.edm_kimg, help="EDM training length in thousands of images")
    g.add_argument("--edm-limit-train", type=int, default=_D.edm_limit_train, help="EDM on the first N training images only")
    g.add_argument("--n-generated", type=int, default=_D.n_generated, help="images in the store (multiple of 10)")
    g.add_argument("--sampler-steps", type=int, default=_D.sampler_steps, help="Heun steps per image (2·steps − 1 evaluations)")
    q = p.add_argument_group("generator quality (robustdiff-fid)")
    q.add_argument("--classifier-limit-train", type=int, default=_D.classifier_limit_train,
                   help="the measuring classifier trains (loss=ce) on the first N real training images")
    q.add_argument("--classifier-epochs", type=int, default=_D.classifier_epochs)
    q.add_argument("--fd-reference", type=int, default=_D.fd_reference, help="FD reference: the first N test images")
    q.add_argument("--floor-start", type=int, default=_D.floor_start,
                   help="held-out real training images from here (as many as the store) give the FD floor")
    t = p.add_argument_group("adversarial training (experiment=fashionmnist_demo, reduced)")
    t.add_argument("--model", default=_D.model, help="model config (default wrn-10-1)")
    t.add_argument("--epochs", type=int, default=_D.epochs)
    t.add_argument("--batch-size", type=int, default=_D.batch_size)
    t.add_argument("--limit-train", type=int, default=_D.limit_train, help="first N real training images (1,024 validate)")
    t.add_argument("--val-size", type=int, default=_D.val_size)
    t.add_argument("--limit-test", type=int, default=_D.limit_test, help="test images for the per-epoch clean accuracy")
    t.add_argument("--ratio", type=float, default=_D.ratio, help="real fraction of each batch in the generated run")
    t.add_argument("--train-override", action="append", default=[], metavar="KEY=VALUE",
                   help="more robustdiff-train overrides for both runs (repeatable), e.g. norm.steps=3")
    e = p.add_argument_group("evaluation")
    e.add_argument("--n-examples", "--aa-n", dest="aa_n", type=int, default=_D.n_examples,
                   help="AutoAttack on the first N test images, as robustdiff-eval --n-examples (--aa-n: the "
                        "same, an older spelling)")
    # The standard four (apgd-ce,apgd-t,fab-t,square) take far longer than training here on a 2-core CPU.
    e.add_argument("--aa-attacks", default=_D.aa_attacks,
                   help="AutoAttack's attacks (default apgd-ce; 'standard' = all four, the paper's evaluation)")
    return p


def demo_settings(args: argparse.Namespace) -> DemoSettings:
    """The parsed command line as the pipeline's settings."""
    return DemoSettings(
        out=args.out, data_dir=args.data_dir, edm_kimg=args.edm_kimg, edm_limit_train=args.edm_limit_train,
        n_generated=args.n_generated, sampler_steps=args.sampler_steps,
        classifier_limit_train=args.classifier_limit_train, classifier_epochs=args.classifier_epochs,
        fd_reference=args.fd_reference, floor_start=args.floor_start, model=args.model, epochs=args.epochs,
        batch_size=args.batch_size, limit_train=args.limit_train, val_size=args.val_size, limit_test=args.limit_test,
        ratio=args.ratio, train_overrides=tuple(args.train_override), n_examples=args.aa_n,
        aa_attacks=args.aa_attacks)


def run_demo(args: argparse.Namespace) -> dict:
    """Run (or resume) every stage and print the summary; returns the pipeline's result (``pipeline.demo``)."""
    from ..evaluation.evaluate import EvaluationError
    from ..pipeline import demo

    try:
        result = demo.run_demo(demo_settings(args))
    except EvaluationError as e:  # the AutoAttack stage refused a run: said as robustdiff-eval says it
        raise SystemExit(f"{e.command}: {e}") from None
    print(f"\nrobustdiff-demo: {result['report']}")
    for r in result["rows"]:
        print(f"  {r['run']:>9}: clean {percent(r['eval_clean'] or r['clean_best'], scale=1)}, "
              f"AutoAttack {percent(r['autoattack'], scale=1)} on {r['eval_n']} test images "
              f"(PGD-{r['pgd_steps'] or '?'} best epoch {percent(r['pgd_best'], scale=1)})")
    print("  " + result["verdict"])
    print("  stage seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in result["seconds"].items()))
    return result


def _check_aa_attacks(parser: argparse.ArgumentParser, text: str | None) -> None:
    """--aa-attacks as robustdiff-eval reads it, checked before the first stage rather than at the fifth."""
    if text and text != "standard":
        from .evaluate import comma_list, standard_attacks

        try:
            comma_list(standard_attacks)(text)
        except argparse.ArgumentTypeError as e:
            parser.error(f"argument --aa-attacks: {e}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_aa_attacks(parser, args.aa_attacks)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    run_demo(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
