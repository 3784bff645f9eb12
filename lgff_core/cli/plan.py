"""`lgff plan` / `lgff scan`: the run-time fan-out and the content fingerprints of the pipelines (lgff_core.kfp.plan).

  lgff plan --data DATA [--rows-per-task N] [--out BLOCKS.json]   work blocks of about N rows (JSON list)
  lgff scan URI... [--out FINGERPRINTS.json]                      content fingerprint of each imported source
            [--mode rebuild|append --base-index IDX]               reindex run parameters: checked; for append
            [--model MODEL] [--metric ip|l2]                       IDX's fingerprint too (sha256 of its index.json),
                                                                   and IDX must fit MODEL's embeddings and the metric

A block is what one embed (and index add) task processes: `lgff embed block --block BLOCK.json ...`.
"""
from __future__ import annotations

import argparse
import json

from . import add_config_args, load_args_config


def register(subparsers) -> None:
    p = subparsers.add_parser("plan", help="split a dataset into work blocks for the embed fan-out",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="dataset URI")
    p.add_argument("--rows-per-task", type=int, help="rows per block (default: config pipeline.rows_per_task)")
    p.add_argument("--out", help="write the blocks as a JSON list to this file / URI")
    add_config_args(p)
    p.set_defaults(func=_plan)

    s = subparsers.add_parser("scan", help="content fingerprint of sources imported by URI (dataset, model)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("uris", nargs="+", metavar="URI")
    s.add_argument("--out", help="write {uri: fingerprint facts} as JSON to this file / URI")
    s.add_argument("--mode", help="reindex mode to check: rebuild or append (append also scans --base-index)")
    s.add_argument("--base-index", default="", help="--mode append: the index to append to (a prefix with index.json)")
    s.add_argument("--model", default="", help="--mode append: the model whose embeddings are appended (the base "
                                               "index must hold vectors of its size)")
    s.add_argument("--metric", default="", help="--mode append: the run's index.metric (the base index must use it)")
    s.set_defaults(func=_scan)


def _plan(args) -> int:
    from .. import storage
    from ..kfp.plan import plan_blocks

    rows = args.rows_per_task if args.rows_per_task is not None else load_args_config(args).pipeline.rows_per_task
    blocks = plan_blocks(args.data, rows)
    if args.out:
        storage.write_text(args.out, json.dumps(blocks, indent=1, sort_keys=True))
    total = sum(b["rows"] for b in blocks)
    print(f"{total} rows -> {len(blocks)} block(s) of about {rows} rows" + (f" -> {args.out}" if args.out else ""))
    return 0


def _scan(args) -> int:
    from .. import storage
    from ..kfp.plan import fingerprint_source, reindex_base

    base = (reindex_base(args.mode, args.base_index, model_uri=args.model, metric=args.metric)
            if args.mode is not None else None)
    facts = {uri: fingerprint_source(uri) for uri in args.uris}
    if base is not None:
        facts[args.base_index] = base
    if args.out:
        storage.write_text(args.out, json.dumps(facts, indent=1, sort_keys=True))
    for uri, f in facts.items():
        print(f"{f['fingerprint'][:16]}  {f['kind']:<10s} {uri}")
    return 0
