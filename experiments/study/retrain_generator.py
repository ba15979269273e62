"""Retrain a shipped study generator from its provenance and compare the snapshots byte for byte.

    python experiments/study/retrain_generator.py experiments/study/generators/fmnist_v2 --out runs/v2-generator

Runs the ``command`` recorded in ``<generator>/provenance.json`` (robustdiff-edm; resumable: rerun the same line
after an interruption) with its run directory under ``--out``, then prints each snapshot's sha256 beside the
shipped one. Exit status 0 when every snapshot is identical, 1 when one differs, 2 on bad input. The shipped
generators were trained with one thread per process (OMP_NUM_THREADS=1) on a CPU; other thread counts or
hardware may round differently.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

from robustdiff.utils.io import file_sha256


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("generator", type=Path, help="a shipped generator folder (with provenance.json)")
    p.add_argument("--out", type=Path, required=True, help="where the retrained EDM run goes (<out>/edm)")
    p.add_argument("--data-dir", default="data", help="dataset directory (default: data, then Debian's location)")
    args = p.parse_args(argv)
    prov_path = args.generator / "provenance.json"
    try:
        prov = json.loads(prov_path.read_text())
        words = shlex.split(prov["command"])
    except (OSError, ValueError, KeyError) as e:
        print(f"error: {prov_path}: cannot read the recorded command ({e})", file=sys.stderr)
        return 2
    if words[:1] != ["robustdiff-edm"]:
        print(f"error: {prov_path}: command is not a robustdiff-edm command: {prov['command']!r}", file=sys.stderr)
        return 2
    replaced = {"run_root": str(args.out), "data_dir": args.data_dir}
    overrides = [w if w.split("=", 1)[0] not in replaced else f"{w.split('=', 1)[0]}={replaced[w.split('=', 1)[0]]}"
                 for w in words[1:]]
    command = [sys.executable, "-m", "robustdiff.cli.train_edm", *overrides]
    print("retraining:", "robustdiff-edm", " ".join(overrides), flush=True)
    if subprocess.call(command) != 0:
        print("error: robustdiff-edm did not finish; rerun this command to resume it", file=sys.stderr)
        return 2
    same = True
    for name, entry in prov["snapshots"].items():
        mine = args.out / "edm" / entry["file"]
        got = file_sha256(mine) if mine.is_file() else "missing"
        ok = got == entry["sha256"]
        same &= ok
        print(f"{name:>16}  {entry['kimg']:g} kimg  {'identical' if ok else 'DIFFERENT'}  shipped {entry['sha256'][:16]}  "
              f"retrained {got[:16]}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
