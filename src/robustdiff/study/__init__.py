"""The studies behind ``robustdiff-study``: does a better generator give better adversarial training?

One job per module (the public names are importable from ``robustdiff.study``):

- ``spec``: a study file — finding it (a path, or a study shipped in ``robustdiff/studies/``), checking it,
  fixing it in the study directory (`load_study`, `StudyError`), and the arms it implies.
- ``stages``: the stages every study passes through (classifier, reference statistics, selector, EDM
  generator and its snapshots, evaluation of an arm), each resumed from its directory.
- ``quality_study``: the generator-quality study (a store per EDM snapshot, TRADES arms, a ratio sweep).
- ``listed``: the study whose file lists its stores and arms, split over commands with disjoint ``--arms``.
- ``run``: `run_study`, the whole study end to end, with the seconds of every stage and the report.

The shipped study files live beside this package, in ``robustdiff/studies/`` (package data).
"""

from .run import StudyResult, run_study
from .spec import StudyError, load_study, resolve_study, shipped_studies

__all__ = ["StudyError", "StudyResult", "load_study", "resolve_study", "run_study", "shipped_studies"]
