"""`lgff index build|train|add|merge|search|remove`: faiss index over an embeddings set (lgff_core.index).

One shot:  lgff index build --embeddings E --out IDX [--factory Flat] [--split train]
           (IVF factories stream: sample-train, encode block by block, inverted lists on disk)
Sharded:   lgff index train --embeddings E --factory IVF1024,SQ8 --out T
           lgff index add --trained T --embeddings E --shard I/N --out P_I      (N independent jobs)
           lgff index add --trained T --embeddings E --rows A:B --out P        (or blocks of selected rows)
           lgff index merge --trained T --partials P_0 ... P_N-1 --out IDX
Append:    lgff index add --to IDX --embeddings NEW --out IDX2                  (new version, parent = IDX)
           [--skip-existing]   (leave out rows whose sample_id IDX holds: NEW may be IDX's rows + new ones)
           (NEW must match IDX: dimension, metric, model, label names; ids already in IDX need --skip-existing)
Remove:    lgff index remove --index IDX --ids IDS.txt --out IDX2               (one sample_id per line, or Parquet)
           (removing every id leaves an empty index; searching it is an error, exit 2)
One writer per --out: a second writer into the same prefix fails naming the holder (or waits storage.lease_wait_s).
Search:    lgff index search --index IDX --queries E --k 10 --out N.parquet [--exclude-self] [--exclude-same-group]
           [--query-split test]   (--k all = the full ranking)
Flat / HNSW above index.max_in_ram_vectors are refused with an IVF factory that fits.
"""
from __future__ import annotations

import argparse

from . import add_config_args, apply_setting_flags, load_args_config


def parse_shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard {text!r}: expected I/N, e.g. 0/4") from None
    if n < 1 or not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"--shard {text!r}: need 0 <= I < N")
    return i, n


def parse_k(text: str):
    if text == "all":
        return "all"
    try:
        k = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--k {text!r}: expected a positive integer or 'all'") from None
    if k < 1:
        raise argparse.ArgumentTypeError(f"--k {text!r}: must be >= 1")
    return k


def parse_rows(text: str) -> tuple[int, int]:
    try:
        a, b = (int(v) for v in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--rows {text!r}: expected START:STOP, e.g. 0:250000") from None
    if not 0 <= a <= b:
        raise argparse.ArgumentTypeError(f"--rows {text!r}: need 0 <= START <= STOP")
    return a, b


def _splits(value):
    if value is None:
        return None
    parts = [s for s in value.split(",") if s]
    return parts[0] if len(parts) == 1 else parts


def register(subparsers) -> None:
    p = subparsers.add_parser("index", help="build / train / add / merge / search a faiss index",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="index_command", metavar="ACTION")
    sub.required = True

    b = sub.add_parser("build", help="one-shot index over an embeddings set")
    b.add_argument("--embeddings", required=True, help="embeddings URI (from `lgff embed`)")
    b.add_argument("--out", required=True, help="index URI (prefix)")
    b.add_argument("--factory", help="faiss index_factory string (default: config index.factory)")
    b.add_argument("--metric", choices=("ip", "l2"), help="default: config index.metric")
    b.add_argument("--split", help="only rows of these split(s), comma-separated (default: all rows)")
    b.add_argument("--train-sample", type=int, help="vectors used to train quantizers (default: config)")
    add_config_args(b)
    b.set_defaults(func=_build)

    t = sub.add_parser("train", help="train an empty index on a sample (sharded builds)")
    t.add_argument("--embeddings", required=True)
    t.add_argument("--out", required=True, help="trained-index URI (prefix)")
    t.add_argument("--factory")
    t.add_argument("--metric", choices=("ip", "l2"))
    t.add_argument("--split")
    t.add_argument("--train-sample", type=int)
    add_config_args(t)
    t.set_defaults(func=_train)

    a = sub.add_parser("add", help="partial index over a block (--trained), or append to an index (--to)")
    target = a.add_mutually_exclusive_group(required=True)
    target.add_argument("--trained", help="URI written by `lgff index train`: write a partial index of one block")
    target.add_argument("--to", help="an index URI: append the embeddings to it as a new index at --out")
    a.add_argument("--embeddings", required=True)
    block = a.add_mutually_exclusive_group()
    block.add_argument("--shard", type=parse_shard, metavar="I/N", help="--trained: embeddings shards block I of N")
    block.add_argument("--rows", type=parse_rows, metavar="A:B", help="--trained: selected rows [A, B)")
    a.add_argument("--out", required=True, help="partial-index URI (--trained) or the new index URI (--to)")
    a.add_argument("--split", help="default: the split the index was trained for (--to: every row)")
    a.add_argument("--skip-existing", action="store_true",
                   help="--to: leave out rows whose sample_id the index already holds, and repeats of an id "
                        "(idempotent reruns over a grown embeddings set); without it such rows are an error")
    add_config_args(a)
    a.set_defaults(func=_add)

    m = sub.add_parser("merge", help="merge N partial indexes into the final index")
    m.add_argument("--trained", required=True)
    m.add_argument("--partials", required=True, nargs="+", help="URIs written by `lgff index add` (all N)")
    m.add_argument("--out", required=True)
    add_config_args(m)
    m.set_defaults(func=_merge)

    r = sub.add_parser("remove", help="a new index without some sample ids")
    r.add_argument("--index", required=True)
    r.add_argument("--ids", required=True, help="text file with one sample_id per line, or Parquet with sample_id")
    r.add_argument("--out", required=True, help="the new index URI (the parent stays as it is)")
    add_config_args(r)
    r.set_defaults(func=_remove)

    s = sub.add_parser("search", help="k nearest neighbours of query embeddings -> neighbours Parquet")
    s.add_argument("--index", required=True)
    s.add_argument("--queries", required=True, help="embeddings URI of the queries")
    s.add_argument("--k", type=parse_k, help="neighbours per query, or 'all' (default: config index.k)")
    s.add_argument("--out", required=True, help="neighbours Parquet URI")
    s.add_argument("--query-split", help="only query rows of this split (e.g. test)")
    s.add_argument("--exclude-self", action=argparse.BooleanOptionalAction, default=None,
                   help="drop the database item with the query's sample_id (leave-one-out; "
                        "default: config index.exclude_self)")
    s.add_argument("--exclude-same-group", action=argparse.BooleanOptionalAction, default=None,
                   help="drop database items from the query's group (scan / slide)")
    s.add_argument("--nprobe", type=int)
    s.add_argument("--ef-search", type=int)
    s.add_argument("--query-batch", type=int, help="queries searched at a time (default: config evaluate.query_batch)")
    add_config_args(s)
    s.set_defaults(func=_search)


def _build(args) -> int:
    from ..index import build_from_embeddings

    cfg = load_args_config(args)
    meta = build_from_embeddings(args.embeddings, args.out, args.factory or cfg.index.factory,
                                 args.metric or cfg.index.metric, _splits(args.split),
                                 args.train_sample if args.train_sample is not None else cfg.index.train_sample,
                                 cfg.seed, nprobe=cfg.index.nprobe, max_in_ram=cfg.index.max_in_ram_vectors,
                                 block_rows=cfg.index.block_rows)
    print(f"index {meta['factory']} with {meta['ntotal']} vectors of dimension {meta['d']} -> {args.out}")
    return 0


def _train(args) -> int:
    from ..index import train_from_embeddings

    cfg = load_args_config(args)
    meta = train_from_embeddings(args.embeddings, args.out, args.factory or cfg.index.factory,
                                 args.metric or cfg.index.metric, _splits(args.split),
                                 args.train_sample if args.train_sample is not None else cfg.index.train_sample,
                                 cfg.seed, nprobe=cfg.index.nprobe, max_in_ram=cfg.index.max_in_ram_vectors)
    print(f"trained {meta['factory']} on {meta['trained_on']} vectors -> {args.out}")
    return 0


def _add(args) -> int:
    from ..errors import IndexError_
    from ..index import add_from_embeddings, append_to_index

    if args.to:
        if args.shard or args.rows:
            raise IndexError_("--to appends a whole embeddings set: --shard / --rows are for --trained")
        cfg = load_args_config(args)
        meta = append_to_index(args.to, args.embeddings, args.out, _splits(args.split),
                               skip_existing=args.skip_existing, block_rows=cfg.index.block_rows,
                               max_in_ram=cfg.index.max_in_ram_vectors)
        held = meta["holds"][-1]
        skipped = f" ({held['skipped']} skipped: already in the index)" if "skipped" in held else ""
        if held.get("repeated"):
            skipped += f" ({held['repeated']} repeated id(s) skipped)"
        print(f"appended {held['rows']} vectors to {args.to}{skipped}: {meta['ntotal']} vectors -> {args.out}")
        return 0
    if args.skip_existing:
        raise IndexError_("--skip-existing is for --to (appending to an index)")
    if not (args.shard or args.rows):
        raise IndexError_("--trained needs the block: --shard I/N or --rows A:B")
    meta = add_from_embeddings(args.trained, args.embeddings, args.out, args.shard, _splits(args.split),
                               rows=args.rows)
    block = f"{args.shard[0]}/{args.shard[1]}" if args.shard else f"rows {meta['rows'][0]}:{meta['rows'][1]}"
    print(f"partial {block}: {meta['ntotal']} vectors -> {args.out}")
    return 0


def _merge(args) -> int:
    from ..index import merge_partials

    cfg = load_args_config(args)
    meta = merge_partials(args.trained, args.partials, args.out, max_in_ram=cfg.index.max_in_ram_vectors)
    print(f"merged {meta['merged_from']} partials: {meta['ntotal']} vectors -> {args.out}")
    return 0


def _remove(args) -> int:
    from ..index import remove_from_index

    load_args_config(args)  # storage limits (lease wait)
    meta = remove_from_index(args.index, args.ids, args.out)
    print(f"removed {meta['removed']} vectors from {args.index}: {meta['ntotal']} vectors -> {args.out}")
    return 0


def _search(args) -> int:
    from ..index import search_to_parquet

    cfg = apply_setting_flags(load_args_config(args), args, {
        "nprobe": "index.nprobe", "ef_search": "index.ef_search", "query_batch": "evaluate.query_batch"})
    k = cfg.index.k if args.k is None else (None if args.k == "all" else args.k)
    exclude_self = cfg.index.exclude_self if args.exclude_self is None else args.exclude_self
    exclude_group = cfg.index.exclude_same_group if args.exclude_same_group is None else args.exclude_same_group
    out = search_to_parquet(args.index, args.queries, args.out, k, query_split=args.query_split,
                            exclude_self=exclude_self, exclude_same_group=exclude_group,
                            nprobe=cfg.index.nprobe,
                            ef_search=cfg.index.ef_search,
                            query_batch=cfg.evaluate.query_batch)
    print(f"{out['n_queries']} queries, k={out['k'] or 'all'} -> {args.out}")
    return 0
