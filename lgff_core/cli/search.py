"""`lgff search`: query an index with new images (files, directories, or sample_ids of a dataset).

  lgff search --model CKPT --index IDX --images a.png dir/ --k 10 --out DIR
  lgff search --baseline --index IDX --dataset DATA --ids s1 s2 --k 5 --out DIR

Queries are embedded exactly as `lgff embed` embeds (same transform, precision and normalisation; pass the same
--config / --set as the embed stage). Writes DIR/results.html (query beside its hits, thumbnails from the indexed
dataset) and DIR/results.json (last): per query a `hits` list of {sample_id, label, label_name, group, score}.
"""
from __future__ import annotations

import argparse

from . import add_config_args, load_args_config


def add_model_args(p: argparse.ArgumentParser) -> None:
    """--model / --baseline / --weights / --index, shared by search, explain and serve."""
    p.add_argument("--model", help="checkpoint URI (a training run's best/ prefix)")
    p.add_argument("--baseline", nargs="?", const="gem-last", choices=("gem-last",),
                   help="query with the frozen backbone + GeM baseline instead of a model")
    p.add_argument("--weights", help="override model.backbone.weights for --baseline (e.g. none)")
    p.add_argument("--index", required=True, help="index URI (from `lgff index build` / `merge`)")


def add_query_args(p: argparse.ArgumentParser, flag: str = "--images") -> None:
    p.add_argument(flag, dest="images", nargs="+", metavar="FILE_OR_DIR", help="query image files / directories")
    p.add_argument("--dataset", help="dataset URI to take query images from, by --ids")
    p.add_argument("--ids", nargs="+", metavar="SAMPLE_ID", help="sample_ids of query images in --dataset")


def check_model_args(args) -> None:
    from ..errors import LGFFError

    if bool(args.model) == bool(args.baseline):
        raise LGFFError("give exactly one of --model CHECKPOINT_URI or --baseline gem-last")


def read_queries(args, flag: str = "--images"):
    from ..errors import LGFFError
    from ..retrieval.search import read_query_files, read_query_ids

    if bool(args.images) == bool(args.dataset or args.ids):
        raise LGFFError(f"give either {flag} FILE_OR_DIR... or --dataset URI --ids SAMPLE_ID...")
    if args.images:
        return read_query_files(args.images)
    if not (args.dataset and args.ids):
        raise LGFFError("--dataset and --ids go together")
    return read_query_ids(args.dataset, args.ids)


def register(subparsers) -> None:
    p = subparsers.add_parser("search", help="query an index with new images -> results.html + results.json",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    add_query_args(p)
    p.add_argument("--k", type=int, help="hits per query (default: config index.k)")
    p.add_argument("--out", required=True, help="output directory URI")
    add_config_args(p)
    p.set_defaults(func=_search)


def _search(args) -> int:
    from ..errors import LGFFError
    from ..retrieval.search import Searcher, search_to_dir

    check_model_args(args)
    cfg = load_args_config(args)
    k = cfg.index.k if args.k is None else args.k
    if k < 1:
        raise LGFFError(f"--k {k}: must be >= 1")
    queries = read_queries(args)
    searcher = Searcher(args.model, args.index, cfg, args.baseline, weights=args.weights)
    doc = search_to_dir(searcher, queries, k, args.out)
    print(f"{len(doc['queries'])} queries, k={k} -> {args.out}/results.html, results.json")
    return 0
