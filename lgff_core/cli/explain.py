"""`lgff explain`: Ablation CAM of a query and its top hits on every terminal neck node (lgff_core.retrieval.explain).

  lgff explain --model CKPT --index IDX --query a.png --top 2 --out DIR
  lgff explain --model CKPT --index IDX --dataset DATA --ids s1 --top 2 --out DIR
  lgff explain --model CKPT --index IDX --sample --out DIR     explain.num_queries queries of the indexed
                                                                dataset's evaluate.query_split (pipeline stage)

Target = cosine similarity of each image's descriptor to the query's. Writes one PNG grid per image (rows = neck
layers; columns = image, P1_2..P4_2 overlays, their collapse), explain.json and explain.html (last).
"""
from __future__ import annotations

import argparse

from . import add_config_args, load_args_config
from .search import add_model_args, add_query_args, read_queries


def register(subparsers) -> None:
    p = subparsers.add_parser("explain", help="Ablation CAM of a query and its top hits (PNG grids + HTML)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    add_query_args(p, "--query")
    p.add_argument("--sample", action="store_true",
                   help="explain config explain.num_queries queries of the indexed dataset's evaluate.query_split")
    p.add_argument("--top", type=int, help="hits explained per query (default: config explain.top)")
    p.add_argument("--out", required=True, help="output directory URI")
    add_config_args(p)
    p.set_defaults(func=_explain)


def _explain(args) -> int:
    from ..errors import LGFFError
    from ..retrieval.explain import explain_index_queries, explain_to_dir
    from ..retrieval.search import Searcher

    if not args.model:
        raise LGFFError("explain needs --model CHECKPOINT_URI (the GeM baseline has no neck to explain)")
    cfg = load_args_config(args)
    top = cfg.explain.top if args.top is None else args.top
    if top < 0:
        raise LGFFError(f"--top {top}: must be >= 0")
    if args.sample:
        if args.images or args.dataset or args.ids:
            raise LGFFError("--sample picks its own queries; drop --query / --dataset / --ids")
        cfg.explain.top = top
        doc = explain_index_queries(args.model, args.index, args.out, cfg)
        print(f"{len(doc['queries'])} sampled queries explained -> {args.out}/explain.html")
        return 0
    queries = read_queries(args, "--query")
    searcher = Searcher(args.model, args.index, cfg)
    doc = explain_to_dir(searcher, queries, top, args.out, cfg.explain.batch_size, cfg.explain.ratio_channels)
    n = sum(len(q["images"]) for q in doc["queries"])
    print(f"{len(doc['queries'])} queries, {n} images explained -> {args.out}/explain.html")
    return 0
