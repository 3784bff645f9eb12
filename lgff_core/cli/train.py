"""`lgff train`: train one strategy stage (a thin call into `lgff_core.train`): the embedding model
(`train_stage`) or, for `model.kind: detection`, LGFFDM on a COCO-form dataset (`train.detection.train_detection`).

    lgff train --config lgffem_cpu --data DATA_URI --out OUT_URI [--stage N] [--init CKPT] [--resume]
               [--feature-cache URI] [--nproc N] [--set train.epochs=2 ...]

`--stage N` applies strategy stage N's overrides (and its `data` URI, when set, replaces --data).
`--nproc N` (N > 1) relaunches this command as N worker processes with `torch.distributed.run` (torchrun,
single node) over the machine's devices: DistributedDataParallel with nccl on CUDA, gloo on CPU;
`train.batch_size` is per process. Only rank 0 writes checkpoints and prints the summary.
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
    p.add_argument("--init", metavar="CHECKPOINT_URI",
                   help="previous stage's checkpoint, or its training output directory (uses its best/)")
    p.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint under --out")
    p.add_argument("--feature-cache", metavar="URI", help="cache frozen-backbone features here and train from them")
    p.add_argument("--no-memory-check", action="store_true",
                   help="start even when the estimated peak memory exceeds the available memory")
    p.add_argument("--stop-after-epoch", type=int, default=None, metavar="N",
                   help="end this invocation after epoch N (the run can be continued with --resume)")
    p.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="data-parallel worker processes on this machine (torchrun; default 1 = no DDP)")
    p.set_defaults(func=run)


def _without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item == "--nproc":
            skip = True
        elif not item.startswith("--nproc="):
            out.append(item)
    return out


def launch_torchrun(nproc: int, argv: list[str]) -> int:
    """Run `lgff <argv>` as `nproc` torchrun workers (standalone rendezvous on this host); returns the exit code."""
    import subprocess
    import sys

    import torch

    from ..errors import LGFFError

    if torch.cuda.is_available() and nproc > torch.cuda.device_count():
        raise LGFFError(f"--nproc {nproc}: only {torch.cuda.device_count()} CUDA device(s) visible")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "lgff_core", *argv]
    return subprocess.call(cmd)


def run(args: argparse.Namespace) -> int:
    from ..errors import DataError
    from ..kfp.pipeline import is_prep_source
    from ..train import train_stage
    from ..train.loop import StopTraining

    if args.nproc < 1:
        raise DataError(f"--nproc {args.nproc}: must be >= 1")
    if args.nproc > 1 and "LOCAL_RANK" not in os.environ:  # not yet under torchrun: become its launcher
        cfg = load_args_config(args)  # bad config -> one error here, not one per worker
        return launch_torchrun(args.nproc, _without_nproc(list(args.argv)))
    cfg = load_args_config(args)
    stage_cfg = cfg.stage(args.stage)
    data = cfg.strategy[args.stage].data or args.data
    if data and is_prep_source(data):  # e.g. samples:NAME: the pipeline preps it; by hand it is --data
        if not args.data:
            raise DataError(f"strategy[{args.stage}].data is {data!r}, a source the pipeline builds with its prep "
                            f"task; build it (`lgff prep ...`) and pass the dataset with --data")
        data = args.data
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
        if stage_cfg.model.kind == "detection":
            from ..train.detection import train_detection

            if args.feature_cache:
                raise DataError("--feature-cache: detection training reads images (augmented boxes and masks)")
            summary = train_detection(stage_cfg, data, args.out, init=args.init, resume=args.resume, progress=True,
                                      on_epoch_end=stop_hook)
        else:
            summary = train_stage(stage_cfg, data, args.out, init=args.init, resume=args.resume,
                                  feature_cache=args.feature_cache, progress=True, on_epoch_end=stop_hook)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 reports
        return 0
    print(json.dumps({k: v for k, v in summary.items() if k != "last"} | {"last": summary.get("last")},
                     indent=1, default=str))
    return 0
