"""robustdiff-study: does a better generator give better adversarial training? The paper's question, end to end.

    robustdiff-study experiments/study/fmnist_quality.yaml --out runs/study        # make study
    robustdiff-study experiments/study/fmnist_quality_quick.yaml --out /tmp/q      # toy size (a test)
    robustdiff-study experiments/study/fmnist_quality.yaml --out runs/study --report-only

A study file (YAML, see ``experiments/study/``) names every stage; this command runs them in order:

  1. classifier   a WideResNet trained normally (loss=ce) on real data: the feature network of classifier FD
                  and the judge of label agreement                                   <out>/classifier
  2. reference    classifier-feature statistics of held-out real images, and the FD of another real sample
                  of the generated sets' size against them (the floor a perfect generator would reach)
                                                                                     <out>/quality/
  3. generator    an EDM trained on the study's real images only; its kept snapshots are generators of
                  different quality                                                  <out>/edm
  4. generate     a store per generator                                               <out>/stores/<gen>
  5. quality      classifier FD and label agreement of every store (also recorded in its manifest)
  6. arms         TRADES with the same model, epochs, batch and seeds: real data only, each generator at a
                  fixed ratio, the best generator (lowest FD, chosen before any training) at a second
                  seed                                                                <out>/runs/<arm>
  7. sweep        the best generator at other ratios, as one Hydra multirun           <out>/sweep/...
  8. evaluation   test PGD of the selected (best) epoch where the per-epoch test pass skipped it, and
                  AutoAttack on the selected checkpoint                               <run>/eval.json
  9. report       <out>/report.md: the overfitting table with generator quality, FD vs robust accuracy,
                  test PGD vs epoch of every arm

Every stage reuses its directory: rerunning the command resumes an interrupted study where it stopped and
only rewrites the report when all is done. The study file is copied to <out>/study.yaml on the first run;
a later run with a different file is refused (the protocol is fixed once results exist).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from ..study.spec import shipped_studies
from .common import argument_parser


def build_parser() -> argparse.ArgumentParser:
    p = argument_parser("robustdiff-study", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("study", type=Path,
                   help=f"a study file, or the name of one shipped with robustdiff ({', '.join(shipped_studies())})")
    p.add_argument("--out", type=Path, required=True, help="study directory (created; rerun to resume)")
    p.add_argument("--data-dir", default="data", help="dataset directory (default: data, then Debian's location)")
    p.add_argument("--report-only", action="store_true", help="only (re)write the report from what exists")
    p.add_argument("--arms", default=None, metavar="A,B",
                   help="a study file listing arms: train and evaluate only these (disjoint lists can run side by "
                        "side); the report waits for every arm")
    p.add_argument("--generator", type=Path, default=None, metavar="DIR",
                   help="take the EDM snapshots from a shipped generator folder (e.g. "
                        "experiments/study/generators/fmnist_v2) instead of training the EDM; a new --out only")
    p.add_argument("--ship-generator", type=Path, default=None, metavar="DIR",
                   help="copy the study's finished EDM snapshots and their provenance into DIR, and stop")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    from ..evaluation.frechet import QualityError
    from ..study import StudyError, run_study
    from ..utils.lock import DirectoryLockedError

    try:
        result = run_study(args.study, args.out, data_dir=args.data_dir, report_only=args.report_only,
                           arms=args.arms.split(",") if args.arms else None, generator=args.generator,
                           ship_generator=args.ship_generator)
    except (StudyError, QualityError, DirectoryLockedError) as e:
        print(f"robustdiff-study: error: {e}", file=sys.stderr)
        return 2
    if args.ship_generator is not None:
        return 0
    if args.report_only:
        print(f"robustdiff-study: wrote {result.report} from the arms that exist")
    elif result.complete:
        print(f"\nrobustdiff-study: {result.report}")
    elif not result.complete:
        print("\nrobustdiff-study: arms still to run or evaluate; the report waits for them "
              "(--report-only writes it from what exists)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
