"""Run by Python at start-up when tests/aids is on PYTHONPATH: installs the test aids the AIDS_* variables ask
for (robustdiff_aids.install_from_env), so that a real robustdiff process gets them without product code.
Without an AIDS_* variable it imports nothing. Another sitecustomize this one shadows still runs."""

import os
import sys


def _run_shadowed() -> None:
    import importlib.machinery
    import importlib.util

    here = os.path.dirname(os.path.abspath(__file__))
    path = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", path)
    if spec is not None and spec.loader is not None and spec.origin != os.path.abspath(__file__):
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)


_run_shadowed()
if any(name.startswith("AIDS_") for name in os.environ):
    import robustdiff_aids

    robustdiff_aids.install_from_env()
