"""`lgff evaluate retrieval|roxford`: retrieval metrics JSON (lgff_core.metrics).

  lgff evaluate retrieval --neighbors N.parquet --protocol test-vs-train --out metrics.json
  lgff evaluate retrieval --embeddings E --protocol leave-one-out --out metrics.json   (exact full ranking: mAP)
  lgff evaluate roxford --gnd gnd_roxford5k.pkl --embeddings E [--queries EQ] --out metrics.json
"""
from __future__ import annotations

import argparse

from . import add_config_args, load_args_config


def _ks(text: str) -> list[int]:
    try:
        ks = [int(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--ks {text!r}: expected comma-separated integers, e.g. 1,5,10") from None
    if not ks or min(ks) < 1:
        raise argparse.ArgumentTypeError(f"--ks {text!r}: need positive integers")
    return ks


def register(subparsers) -> None:
    p = subparsers.add_parser("evaluate", help="retrieval metrics (eta, Recall@k, mAP, mMV@5, revisited Oxford)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="evaluate_command", metavar="WHAT")
    sub.required = True

    r = sub.add_parser("retrieval", help="Kimia-style and ranking metrics for one protocol")
    src = r.add_mutually_exclusive_group(required=True)
    src.add_argument("--neighbors", help="neighbours Parquet from `lgff index search`")
    src.add_argument("--embeddings", help="embeddings URI: rank the whole database exactly (gives full mAP)")
    r.add_argument("--protocol", choices=("test-vs-train", "leave-one-out"),
                   help="default: config evaluate.protocol")
    r.add_argument("--index", help="--embeddings only: search this index (rows outside the protocol's database "
                                   "split are excluded) instead of an exact in-memory Flat index")
    r.add_argument("--k", type=int, help="--embeddings only: neighbours per query (default: config evaluate.k; "
                                         "unset = the whole database, needed for full mAP)")
    r.add_argument("--out", required=True, help="metrics JSON URI (ending in .json), or a directory that gets "
                                                "metrics.json and neighbors.parquet")
    r.add_argument("--model", "--label", dest="model",
                   help="model name recorded in the JSON (default: from the embeddings manifest); "
                        "names starting with 'baseline' mark the baseline in reports")
    r.add_argument("--ks", type=_ks, help="Recall/precision cut-offs (default: config evaluate.ks)")
    r.add_argument("--query-split", help="--embeddings only (default: config evaluate.query_split)")
    r.add_argument("--database-split", help="--embeddings, test-vs-train only (default: config evaluate.database_split)")
    r.add_argument("--exclude-same-group", action="store_true", help="--embeddings only")
    r.add_argument("--neighbors-out", help="--embeddings only: also write the full-ranking neighbours Parquet")
    r.add_argument("--max-queries", type=int, help="--embeddings only: evaluate a seeded class-stratified sample of "
                                                   "at most this many queries (default: config evaluate.max_queries)")
    r.add_argument("--query-batch", type=int, help="--embeddings only: queries searched at a time "
                                                   "(default: config evaluate.query_batch)")
    add_config_args(r)
    r.set_defaults(func=_retrieval)

    o = sub.add_parser("roxford", help="revisited Oxford / Paris mAP Easy / Medium / Hard")
    o.add_argument("--gnd", required=True, help="revisitop gnd_*.pkl (imlist, qimlist, gnd)")
    o.add_argument("--embeddings", required=True, help="database embeddings (sample_id = imlist names)")
    o.add_argument("--queries", help="query embeddings (sample_id = qimlist names); default: --embeddings")
    o.add_argument("--out", required=True)
    o.add_argument("--model")
    o.set_defaults(func=_roxford)


def _fmt(v):
    return "-" if v is None else (f"{100 * v:6.2f}" if isinstance(v, float) else str(v))


def _retrieval(args) -> int:
    from ..metrics import evaluate_embeddings, evaluate_neighbours, write_metrics

    cfg = load_args_config(args)
    protocol = args.protocol or cfg.evaluate.protocol
    ks = args.ks or cfg.evaluate.ks
    from .. import storage

    if args.out.endswith(".json"):
        metrics_uri, neighbours_out = args.out, args.neighbors_out
    else:
        metrics_uri = storage.join(args.out, "metrics.json")
        neighbours_out = args.neighbors_out or (None if args.neighbors else storage.join(args.out, "neighbors.parquet"))
    if args.neighbors:
        result = evaluate_neighbours(args.neighbors, protocol, ks, mv_k=cfg.evaluate.mv_k, model=args.model)
    else:
        result = evaluate_embeddings(args.embeddings, protocol, index_uri=args.index,
                                     query_split=args.query_split or cfg.evaluate.query_split,
                                     database_split=args.database_split or cfg.evaluate.database_split,
                                     k=args.k if args.k is not None else cfg.evaluate.k,
                                     exclude_same_group=args.exclude_same_group or cfg.evaluate.exclude_same_group,
                                     ks=ks, mv_k=cfg.evaluate.mv_k, model=args.model, neighbours_out=neighbours_out,
                                     max_queries=args.max_queries or cfg.evaluate.max_queries, seed=cfg.seed,
                                     query_batch=args.query_batch or cfg.evaluate.query_batch,
                                     max_full_ranking=cfg.evaluate.max_full_ranking,
                                     k_at_scale=cfg.evaluate.k_at_scale, max_in_ram=cfg.index.max_in_ram_vectors)
    write_metrics(result, metrics_uri)
    m = result["metrics"]
    sample = result.get("sample") or {}
    sampled = (f" (seeded sample of {sample['n_queries_total']}, seed {sample['seed']})"
               if sample.get("sampled") else "")
    print(f"{result['model']} / {protocol}: {result['n_queries']} queries{sampled}")
    for key, value in m.items():
        if isinstance(value, float):
            print(f"  {key:>12s} {_fmt(value)}")
    print(f"-> {metrics_uri}")
    return 0


def _roxford(args) -> int:
    from ..metrics import evaluate_roxford, write_metrics

    result = evaluate_roxford(args.gnd, args.embeddings, args.queries, model=args.model)
    write_metrics(result, args.out)
    for setup, m in result["metrics"].items():
        print(f"  {setup:>6s} mAP {_fmt(m['map'])}  mP@10 {_fmt(m.get('mp@10'))}")
    print(f"-> {args.out}")
    return 0
