"""`lgff train`: train one strategy stage of the embedding model (a thin call into `lgff_core.train.train_stage`).

    lgff train --config lgffem_cpu --data DATA_URI --out OUT_URI [--stage N] [--init CKPT] [--resume]
               [--feature-cache URI] [--set train.epochs=2 ...]

`--stage N` applies strategy stage N's overrides (and its `data` URI, when set, replaces --data).
"""
from __future__ import annotations

import argparse
import json
import os

from . import add_config_args, load_args_config


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="train one strategy stage (frozen backbone; neck + head + ArcFace)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p, default="lgffem_cpu")
    p.add_argument("--data", help="dataset URI (Parquet shards + _manifest.json); optional when the stage sets data")
    p.add_argument("--out", required=True, help="output URI: last/, best/, metrics.jsonl")
    p.add_argument("--stage", type=int, default=0, help="strategy stage index (default 0)")
    p.add_argument("--init", metavar="CHECKPOINT_URI", help="previous stage's checkpoint (e.g. RUN/best)")
    p.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint under --out")
    p.add_argument("--feature-cache", metavar="URI", help="cache frozen-backbone features here and train from them")
    p.add_argument("--no-memory-check", action="store_true",
                   help="start even when the estimated peak memory exceeds the available memory")
    p.add_argument("--stop-after-epoch", type=int, default=None, metavar="N",
                   help="end this invocation after epoch N (the run can be continued with --resume)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..errors import DataError
    from ..train import train_stage
    from ..train.trainer import StopTraining

    cfg = load_args_config(args)
    stage_cfg = cfg.stage(args.stage)
    data = cfg.strategy[args.stage].data or args.data
    if not data:
        raise DataError(f"no dataset: pass --data or set strategy[{args.stage}].data in the config")
    if not args.no_memory_check and stage_cfg.model.kind == "embedding":
        from ..memory import check_memory

        check_memory("train", stage_cfg.model, stage_cfg.train.image_size, stage_cfg.train.batch_size)

    def stop_hook(row: dict) -> None:
        if args.stop_after_epoch is not None and row["epoch"] >= args.stop_after_epoch:
            raise StopTraining

    import contextlib

    from .. import storage

    # one writer per --out (two runs into one prefix would interleave checkpoints); under torchrun rank 0 writes
    held = (storage.lease(args.out, owner="lgff train") if int(os.environ.get("RANK", "0")) == 0
            else contextlib.nullcontext())
    with held:
        summary = train_stage(stage_cfg, data, args.out, init=args.init, resume=args.resume,
                              feature_cache=args.feature_cache, progress=True,
                              on_epoch_end=stop_hook)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 reports
        return 0
    print(json.dumps({k: v for k, v in summary.items() if k != "last"} | {"last": summary.get("last")},
                     indent=1, default=str))
    return 0
