"""What every argparse command shares: whole option names only (``--n`` is never read as ``--no-progress``)
and ``--version``. The Hydra commands answer ``--version`` through ``hydra_conf.run_hydra_command``."""

from __future__ import annotations

import argparse

from .. import __version__


def version_line(prog: str) -> str:
    return f"{prog} (robustdiff {__version__})"


def argument_parser(prog: str, **kwargs) -> argparse.ArgumentParser:
    """An ``ArgumentParser`` for ``prog`` that refuses abbreviated options and has ``--version``."""
    parser = argparse.ArgumentParser(prog=prog, allow_abbrev=False, **kwargs)
    parser.add_argument("--version", action="version", version=version_line(prog))
    return parser


def add_subcommand(subparsers, name: str, **kwargs) -> argparse.ArgumentParser:
    """A subcommand parser with the same rules (no abbreviated options)."""
    return subparsers.add_parser(name, allow_abbrev=False, **kwargs)
