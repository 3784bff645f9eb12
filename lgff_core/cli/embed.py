"""`lgff embed`: embeddings Parquet of a dataset with a trained model or the GeM baseline (lgff_core.retrieval.embed).

  lgff embed --model CHECKPOINT_URI --data DATA --out EMB [--shard I/N]     one output shard per input shard
  lgff embed --baseline [gem-last] --data DATA --out EMB                    frozen backbone + GeM, no checkpoint
  lgff embed finalize --data DATA --out EMB                                 publish the manifest (all shards done)
  lgff embed block --block BLOCK.json (--model M | --baseline) --out EMB    one work block of `lgff plan`
  lgff embed collect PART_URI... --out EMB                                  one manifest naming the parts' shards

Shards already embedded (same input shard, same model and settings) are skipped, so a killed run resumes.
One writer per --out (its writer lease): a second run into the same prefix fails naming the holder, or waits
storage.lease_wait_s. Jobs with --shard I/N run in parallel into separate prefixes, then `collect`; into one --out
they take turns (with a lease wait) and the job that completes the last shard publishes the manifest.
"""
from __future__ import annotations

import argparse
import sys

from . import add_config_args, load_args_config
from .index import parse_shard


def register(subparsers) -> None:
    p = subparsers.add_parser("embed", help="embed a dataset (model checkpoint or GeM baseline)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint URI, or a training output directory (its best/ checkpoint is used)")
    p.add_argument("--baseline", nargs="?", const="gem-last", choices=("gem-last",),
                   help="embed with the frozen backbone + GeM on its last level instead of a model")
    p.add_argument("--data", help="dataset URI")
    p.add_argument("--out", help="embeddings URI (prefix)")
    p.add_argument("--shard", type=parse_shard, default=(0, 1), metavar="I/N",
                   help="embed only the contiguous block I of N of the input shards")
    p.add_argument("--weights", help="override model.backbone.weights for --baseline (e.g. none)")
    p.add_argument("--block", help="with `block`: a block from `lgff plan` (JSON file / URI, or the JSON itself)")
    p.add_argument("--no-memory-check", action="store_true",
                   help="start even when the estimated peak memory exceeds the available memory")
    add_config_args(p)
    p.set_defaults(func=_embed)
    # `finalize` / `collect` are positional actions; plain `lgff embed --data ...` stays the main form
    p.add_argument("action", nargs="?", choices=("finalize", "collect", "block"), help=argparse.SUPPRESS)
    p.add_argument("parts", nargs="*", help=argparse.SUPPRESS)


def _embed(args) -> int:
    from ..errors import LGFFError

    if args.action == "collect":
        from ..retrieval.embed import collect_embeddings

        if not args.parts or not args.out:
            raise LGFFError("usage: lgff embed collect PART_URI... --out URI")
        m = collect_embeddings(args.parts, args.out)
        print(f"collected {len(m['shards'])} shards, {m['num_rows']} embeddings -> {args.out}")
        return 0
    if args.action == "block":
        return _embed_block(args)
    if not args.data or not args.out:
        raise LGFFError("--data and --out are required")
    if args.action == "finalize":
        from ..retrieval.embed import finalize_embeddings

        m = finalize_embeddings(args.out, args.data)
        print(f"manifest: {m['num_rows']} embeddings in {len(m['shards'])} shards -> {args.out}")
        return 0
    if args.parts:
        raise LGFFError(f"unexpected arguments: {' '.join(args.parts)}")
    if bool(args.model) == bool(args.baseline):
        raise LGFFError("give exactly one of --model CHECKPOINT_URI or --baseline gem-last")

    from tqdm import tqdm

    from ..data.shards import read_manifest, shard_subset
    from ..retrieval.embed import embed_dataset, load_embedder

    cfg = load_args_config(args)
    manifest = read_manifest(args.data)
    block = shard_subset(manifest.num_shards, *args.shard)
    total = sum(manifest.shards[i].num_rows for i in block)
    embedder = load_embedder(args.model, cfg, args.baseline, weights=args.weights)
    if not args.no_memory_check:
        from ..config import config_from_dict
        from ..memory import check_memory
        from ..train.checkpoint import read_sidecar

        model_cfg = (config_from_dict(read_sidecar(args.model)["config"]).model if args.model else cfg.model)
        check_memory("embed", model_cfg, embedder.image_size, cfg.embed.batch_size, neck=not args.baseline)
    with tqdm(total=total, unit="img", desc=f"embed {args.shard[0]}/{args.shard[1]}", file=sys.stderr,
              disable=None) as bar:
        summary = embed_dataset(args.model, args.data, args.out, cfg, args.baseline, args.shard,
                                embedder=embedder, progress=bar.update)
    speed = f", {summary['images_per_s']:.1f} img/s" if summary["images_per_s"] else ""
    print(f"{summary['model']}: embedded {len(summary['embedded'])} shard(s) ({summary['rows']} images{speed}), "
          f"skipped {len(summary['skipped'])} already done; "
          + ("manifest published" if summary["published"] else "manifest not yet published (shards missing)")
          + f" -> {args.out}")
    return 0


def _embed_block(args) -> int:
    from tqdm import tqdm

    from ..retrieval.embed import embed_block
    from ..errors import LGFFError
    from ..kfp.plan import read_block

    if not args.block or not args.out:
        raise LGFFError("usage: lgff embed block --block BLOCK.json (--model URI | --baseline) --out URI")
    if bool(args.model) == bool(args.baseline):
        raise LGFFError("give exactly one of --model CHECKPOINT_URI or --baseline gem-last")
    block = read_block(args.block)
    cfg = load_args_config(args)
    with tqdm(total=block.get("rows"), unit="img", desc=f"embed block {block['block']}", file=sys.stderr,
              disable=None) as bar:
        m = embed_block(block, args.out, cfg, args.model, args.baseline, progress=bar.update)
    print(f"{m['model']}: block {block['block']}: {m['num_rows']} embeddings -> {args.out}")
    return 0
