"""robustdiff-store: import, export, inspect and verify generated-data stores.

    robustdiff-store import 1m.npz --out data/generated/cifar10-1m
    robustdiff-store import 50m_part1.npz 50m_part2.npz 50m_part3.npz 50m_part4.npz --out STORE
    robustdiff-store export STORE --out out.npz
    robustdiff-store info STORE [--json]
    robustdiff-store verify STORE

An interrupted import is resumed by running the same command again. Exit status: 0 success,
1 a problem with the data (a failed verify, a bad file), 2 a usage error.
"""

from __future__ import annotations

import argparse
import json
import sys

from robustdiff.data.store import (
    DEFAULT_SHARD_SIZE,
    StoreError,
    export_npz,
    import_npz,
    quality_summary,
    store_info,
    verify_store,
)
from robustdiff.utils.io import describe_os_error

from .common import add_subcommand, argument_parser


def _parser() -> argparse.ArgumentParser:
    p = argument_parser("robustdiff-store", description="Manage generated-data stores.")
    sub = p.add_subparsers(dest="command", required=True)

    imp = add_subcommand(sub, "import", help="import reference-layout .npz files ('image', 'label') into a store")
    imp.add_argument("npz", nargs="+", help=".npz parts, in order")
    imp.add_argument("--out", required=True, help="store directory (new, or a partial import to resume)")
    imp.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="images per shard")
    imp.add_argument("--num-classes", type=int, default=None, help="default: max label + 1")
    imp.add_argument("--no-progress", action="store_true")

    exp = add_subcommand(sub, "export", help="export a store to an uncompressed reference-layout .npz")
    exp.add_argument("store")
    exp.add_argument("--out", dest="out_flag", default=None, metavar="OUT.npz",
                     help="output .npz path (must not exist unless --overwrite; its directory must exist)")
    exp.add_argument("out", nargs="?", default=None, help=argparse.SUPPRESS)  # deprecated: OUT after STORE
    exp.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    exp.add_argument("--no-progress", action="store_true")

    info = add_subcommand(sub, "info", help="print a store's manifest summary")
    info.add_argument("store")
    info.add_argument("--json", action="store_true", help="print the whole manifest as JSON")

    ver = add_subcommand(sub, "verify", help="check every shard's size and sha256 checksum")
    ver.add_argument("store")
    ver.add_argument("--no-progress", action="store_true")
    return p


def _summary(m: dict) -> str:
    shape = "×".join(map(str, m["image_shape"]))
    gib = sum(s["images_bytes"] + s["labels_bytes"] for s in m["shards"]) / 2**30
    counts = m["class_counts"]
    lines = [
        f"images      {m['count']:,} ({shape}, uint8), {gib:.2f} GiB",
        f"complete    {m['complete']}",
        f"classes     {m['num_classes']} (per class: min {min(counts):,}, max {max(counts):,})",
        f"shards      {len(m['shards'])} × up to {m['shard_size']:,}",
        f"provenance  {json.dumps(m.get('provenance', {}), sort_keys=True)}",
    ]
    lines += [f"quality     {line}" for line in quality_summary(m)] or [
        "quality     not measured (robustdiff-fid score STORE --ref REF.npz --classifier RUN)"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "export":  # --out, as for import; the older positional OUT still works, with a note
        if args.out is not None and args.out_flag is not None:
            parser.error("export: give the output file once, as --out OUT.npz")
        if args.out is None and args.out_flag is None:
            parser.error("export: give the output file: robustdiff-store export STORE --out OUT.npz")
        if args.out is not None:
            print(f"robustdiff-store: note: 'export STORE OUT' is deprecated; write 'export STORE --out {args.out}'",
                  file=sys.stderr)
        args.out = args.out if args.out is not None else args.out_flag
    try:
        if args.command == "import":
            m = import_npz(
                args.npz,
                args.out,
                shard_size=args.shard_size,
                num_classes=args.num_classes,
                progress=not args.no_progress,
            )
            print(f"imported {m['count']:,} images into {args.out}")
        elif args.command == "export":
            export_npz(args.store, args.out, progress=not args.no_progress, overwrite=args.overwrite)
            print(f"exported {args.store} to {args.out}")
        elif args.command == "info":
            m = store_info(args.store)
            print(json.dumps(m, indent=2, sort_keys=True) if args.json else _summary(m))
        elif args.command == "verify":
            problems = verify_store(args.store, progress=not args.no_progress)
            if problems:
                for problem in problems:
                    print(f"error: {problem}", file=sys.stderr)
                print(f"{args.store}: {len(problems)} problem(s) found", file=sys.stderr)
                return 1
            print(f"{args.store}: OK")
    except StoreError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a read-only or full disk, a path through a file: the file and the fix, not a traceback
        hint = {"import": "give --out a directory you can write to",
                "export": "give an output path you can write to"}.get(args.command, "")
        print(f"error: {describe_os_error(e, hint)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
