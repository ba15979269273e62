"""robustdiff-eval: clean / PGD-40 / AutoAttack accuracy of a training run or a checkpoint, and export.

    robustdiff-eval RUN_DIR_OR_CHECKPOINT [--dataset D] [--norm linf|l2] [--eps 8/255] [--n-examples N]
                    [--batch-size 128] [--attacks clean,pgd,autoattack] [--seed 0] [--data-dir DIR]
                    [--out DIR] [--device cpu|cuda] [--no-wandb | --wandb-project P [--wandb-entity E]]
    robustdiff-eval export RUN_DIR_OR_CHECKPOINT --out model.pt [--card card.json] ...

Settings come from the run's run.json when given a run directory; every flag given on the command
line overrides it (never the other way round), and eval.json records where each setting came from.
An interrupted AutoAttack resumes when the same command is run again (state under OUT/autoattack_state/).
Results of a run that logged to W&B (logger=wandb: wandb.json in the run directory) are added to that same
W&B run (same id, resume="allow"; WANDB_MODE and WANDB_DIR apply); a checkpoint file's go to a new run of
job_type "eval" with --wandb-project.
A run directory literally named "export" must be written as ./export.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

# torch is imported by the library functions, when they run: --help answers at once.
from ..conf.schema import ATTACK_LOSSES
from ..evaluation.evaluate import ATTACKS, EvalRequest, EvaluationError, evaluate
from .common import argument_parser


def parse_count(text: str) -> int:
    """'20M' -> 20_000_000, '500K' -> 500_000, '1000' -> 1000."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmM]?)\s*", str(text))
    if not m:
        raise argparse.ArgumentTypeError(f"cannot read a count from {text!r} (write e.g. 1000, 500K or 20M)")
    scale = {"": 1, "k": 1000, "m": 1_000_000}[m.group(2).lower()]
    return round(float(m.group(1)) * scale)


def comma_list(choices: Sequence[str] | Callable[[], Sequence[str]]):
    def parse(text: str) -> list[str]:
        nonlocal choices
        choices = choices() if callable(choices) else choices
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if t not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(choices)} (comma-separated), got {text!r}")
        return items
    return parse


def standard_attacks() -> tuple[str, ...]:
    from ..evaluation.autoattack import STANDARD_ATTACKS  # torch: only when --aa-attacks is given

    return STANDARD_ATTACKS


def _add_common(p: argparse.ArgumentParser) -> None:
    # default=None everywhere: "not given" must stay distinguishable from "given the default value".
    p.add_argument("target", type=Path, help="a run directory (with run.json) or a checkpoint file")
    p.add_argument("--dataset", default=None, help="dataset name (default: from run.json)")
    p.add_argument("--norm", choices=("linf", "l2"), default=None, help="threat model (default: from run.json)")
    p.add_argument("--eps", default=None, help="radius for images in [0, 1], e.g. 8/255 (default: from run.json)")
    p.add_argument("--weights", choices=("ema", "live"), default="ema",
                   help="which weights of a reference checkpoint holding both (default ema)")
    p.add_argument("--n-generated", type=parse_count, default=None,
                   help="generated images used in training, for the paper comparison (default: from run.json)")


def build_parser() -> argparse.ArgumentParser:
    p = argument_parser("robustdiff-eval", description=__doc__.split("\n\n")[0],
                        epilog="robustdiff-eval export RUN_OR_CHECKPOINT --out model.pt [--card card.json]: the model "
                               "in RobustBench's layout, checked to give the same logits, with an optional model "
                               "card (robustdiff-eval export --help)")
    _add_common(p)
    p.add_argument("--step", default=None, help="PGD step size (default: the run's step, else eps/4)")
    p.add_argument("--pgd-steps", type=int, default=None,
                   help="PGD iterations (default: the run's eval.steps from run.json, else 40)")
    p.add_argument("--pgd-loss", choices=ATTACK_LOSSES, default=None,
                   help="PGD loss (default: the run's eval.test_loss from run.json, else ce)")
    p.add_argument("--n-examples", type=int, default=None, help="first N test images (default: all)")
    p.add_argument("--batch-size", type=int, default=None, help="batch size (default 128)")
    p.add_argument("--attacks", type=comma_list(ATTACKS), default=None, help="default clean,pgd,autoattack")
    p.add_argument("--aa-attacks", type=comma_list(standard_attacks), default=None,
                   help="a subset of AutoAttack's attacks for a quick look (default: all four = standard)")
    p.add_argument("--aa-targets", type=int, default=None,
                   help="target classes of APGD-T/FAB-T (standard 9; fewer is cheaper and weaker, and is recorded)")
    p.add_argument("--seed", type=int, default=None, help="attack seed (default 0)")
    p.add_argument("--data-dir", default=None, help="dataset directory (default: from run.json, else ./data)")
    p.add_argument("--out", type=Path, default=None,
                   help="output directory for eval.json / eval.md (default: the run directory, or "
                        "<checkpoint stem>_eval beside a checkpoint file)")
    p.add_argument("--device", default=None, help="auto (default: the GPU when there is one), cpu, gpu, cuda, cuda:1, ...")
    p.add_argument("--expected-clean", type=float, default=None,
                   help="recorded clean accuracy (fraction or %%) to check an imported model against "
                        "(default: the run's summary.json, else the paper's number for the setting)")
    p.add_argument("--no-resume", action="store_true", help="don't keep or use AutoAttack resume state")
    p.add_argument("--no-wandb", action="store_true",
                   help="don't add the results to the training run's W&B run (wandb.json in the run directory)")
    p.add_argument("--wandb-project", default=None,
                   help="log the results to a new W&B run (job_type eval) of this project when the target has no "
                        "W&B run of its own (a checkpoint file, a run trained without logger=wandb)")
    p.add_argument("--wandb-entity", default=None)
    return p


def build_export_parser() -> argparse.ArgumentParser:
    p = argument_parser("robustdiff-eval export",
                        description="Export a run's model (or a checkpoint) in RobustBench's layout")
    _add_common(p)
    p.add_argument("--out", type=Path, required=True, help="output .pt (plain DMWideResNet state dict)")
    p.add_argument("--card", type=Path, default=None, help="also write a RobustBench model-info JSON here")
    p.add_argument("--overwrite", action="store_true", help="replace existing --out/--card files")
    p.add_argument("--eval-json", type=Path, default=None,
                   help="eval.json with the accuracies for the card (default: the run directory's)")
    p.add_argument("--name", default=None, help="the card's model name (default: the run's name)")
    p.add_argument("--authors", default=None, help="the card's authors: yours (default: empty)")
    p.add_argument("--link", default=None, help="the card's link to your paper or code (default: empty)")
    p.add_argument("--venue", default=None, help="the card's venue (default: empty)")
    return p


def eval_request(args: argparse.Namespace) -> EvalRequest:
    """The parsed command line as the library's request (None: from run.json, else the default)."""
    return EvalRequest(
        target=args.target, dataset=args.dataset, norm=args.norm, eps=args.eps, weights=args.weights,
        n_generated=args.n_generated, step=args.step, pgd_steps=args.pgd_steps, pgd_loss=args.pgd_loss,
        n_examples=args.n_examples, batch_size=args.batch_size, attacks=args.attacks, aa_attacks=args.aa_attacks,
        aa_targets=args.aa_targets, seed=args.seed, data_dir=args.data_dir, out=args.out, device=args.device,
        expected_clean=args.expected_clean, resume=not args.no_resume, wandb=not args.no_wandb,
        wandb_project=args.wandb_project, wandb_entity=args.wandb_entity)


def run_evaluation(args: argparse.Namespace) -> dict:
    """Evaluate as the command line says; what the library refuses ends the command with its one-line message."""
    try:
        return evaluate(eval_request(args))
    except EvaluationError as e:
        raise SystemExit(f"{e.command}: {e}") from None


def run_export(args: argparse.Namespace) -> dict:
    """Export as the command line says; what the library refuses ends the command with its one-line message."""
    from ..data.store import StoreError
    from ..evaluation.export import ExportRequest, export_run

    request = ExportRequest(
        target=args.target, dataset=args.dataset, norm=args.norm, eps=args.eps, weights=args.weights,
        n_generated=args.n_generated, out=args.out, card=args.card, overwrite=args.overwrite,
        eval_json=args.eval_json, name=args.name, authors=args.authors, link=args.link, venue=args.venue)
    try:
        return export_run(request)
    except StoreError as e:  # an existing --out/--card, a missing directory: the message names the flag
        raise SystemExit(str(e)) from None
    except EvaluationError as e:
        raise SystemExit(f"{e.command}: {e}") from None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    if argv and argv[0] == "export":
        run_export(build_export_parser().parse_args(argv[1:]))
    else:
        run_evaluation(build_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
