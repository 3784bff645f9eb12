"""Training benchmarks (run by hand; `make bench` runs the speed part).

    python bench/train.py speed   [--config configs/demo.yaml] [--data URI]
        epoch time from the feature cache vs from images (same data, same model, one process), and training
        images/s of the neck + head vs a forward pass of the frozen backbone alone.
    python bench/train.py quality [--config configs/demo.yaml] [--data URI] [--out DIR] [--set k=v ...]
        trains with the feature cache (`train_stage`), then compares the best checkpoint with the frozen-backbone
        GeM baseline (same backbone, same image size) on the test split: queries = test, database = train,
        exact cosine kNN; Recall@1 / @5 and mAP over the full ranking (lgff_core.evaluate.metrics).

Data default: the real `histolytics-nuclei` sample set, built with `lgff prep samples --out /tmp/lgff-samples`
when missing. Threads: torch uses OMP_NUM_THREADS (default 2 here).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "2")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from lgff_core.evaluate import metrics  # noqa: E402
from lgff_core.config import CONFIG_DIR, load_config  # noqa: E402
from lgff_core.data.transforms import eval_transform  # noqa: E402
from lgff_core.train import train_stage  # noqa: E402
from lgff_core.train.checkpoint import load_model_from_checkpoint  # noqa: E402
from lgff_core.device import frozen_backbone_precision, resolve_device  # noqa: E402
from lgff_core.train.embedding import _iter_split_batches  # noqa: E402

DEFAULT_DATA = "/tmp/lgff-samples/histolytics-nuclei"


def ensure_data(uri: str) -> str:
    if uri == DEFAULT_DATA and not os.path.exists(os.path.join(uri, "_manifest.json")):
        subprocess.run([sys.executable, "-m", "lgff_core", "prep", "samples", "--out", os.path.dirname(uri)],
                       check=True)
    return uri


def default_config() -> str:
    demo = CONFIG_DIR / "demo.yaml"
    return str(demo) if demo.exists() else "lgffem_cpu"


@torch.no_grad()
def embed_split(model, data_uri: str, split: str, image_size: int, cfg) -> tuple[np.ndarray, np.ndarray]:
    device = next(model.parameters()).device
    precision = frozen_backbone_precision(cfg, device)
    bf16, cl = precision.bf16, precision.channels_last
    model.eval()
    if cl:
        model.backbone.to(memory_format=torch.channels_last)
    tf = eval_transform(model.backbone.data_config, image_size)
    xs, ys = [], []
    for batch in _iter_split_batches(data_uri, split, tf, 64):
        x = batch["image"].to(device)
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            feats = [f.float() for f in model.forward_features(x)]
        xs.append(model.forward_head(feats).float().cpu())
        ys.append(batch["label"].numpy())
    x = torch.nn.functional.normalize(torch.cat(xs), dim=1).numpy()
    return x, np.concatenate(ys)


def retrieval(model, data_uri: str, image_size: int, cfg) -> dict:
    """test-vs-train: exact cosine ranking of the whole train split for every test query."""
    xb, yb = embed_split(model, data_uri, cfg.train.train_split, image_size, cfg)
    xq, yq = embed_split(model, data_uri, "test", image_size, cfg)
    nl = np.concatenate([yb[I] for _, I, _ in metrics.full_ranking(xq, xb)])
    num_relevant = np.array([(yb == y).sum() for y in yq])
    return {"recall@1": metrics.recall_at_k(yq, nl, 1), "recall@5": metrics.recall_at_k(yq, nl, 5),
            "map": metrics.mean_average_precision(nl == yq[:, None], num_relevant), "n_queries": int(len(yq)),
            "n_database": int(len(yb))}


def cmd_quality(args) -> None:
    from lgff_core.models import build_baseline

    cfg = load_config(args.config, args.set)
    data = ensure_data(args.data)
    out = args.out
    t0 = time.perf_counter()
    summary = train_stage(cfg, data, out, feature_cache=args.feature_cache or os.path.join(out, "_feature_cache"),
                          progress=True)
    train_s = time.perf_counter() - t0
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    model, meta = load_model_from_checkpoint(os.path.join(out, "best"))
    trained = retrieval(model, data, cfg.train.image_size, cfg)
    baseline = retrieval(build_baseline(cfg), data, cfg.train.image_size, cfg)
    report = {"config": args.config, "overrides": args.set, "train_wall_s": round(train_s, 1),
              "best_epoch": summary["best_epoch"], "epochs": [
                  {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()
                   if k in ("epoch", "train_loss", "val_recall@1", "img_per_s", "train_time_s", "train_cpu_s")} for r in rows],
              "test_vs_train": {"lgffem": trained, "gem_baseline": baseline}}
    print(json.dumps(report, indent=1))


def _backbone_images_per_s(model, cfg, device, n_batches: int = 4) -> float:
    bs, size = cfg.train.batch_size, cfg.train.image_size
    precision = frozen_backbone_precision(cfg, device)
    bf16, cl = precision.bf16, precision.channels_last
    if cl:
        model.backbone.to(memory_format=torch.channels_last)
    x = torch.randn(bs, 3, size, size, device=device)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        model.forward_features(x)  # warm-up
        t = time.perf_counter()
        for _ in range(n_batches):
            model.forward_features(x)
    return n_batches * bs / (time.perf_counter() - t)


def cmd_speed(args) -> None:
    from lgff_core.models import build_model

    cfg = load_config(args.config, list(args.set) + ["train.epochs=2"])
    data = ensure_data(args.data)
    work = tempfile.mkdtemp(prefix="lgff-bench-train-")
    try:
        t = time.perf_counter()
        # the image path must not use a cache, whatever the config says (demo.yaml sets feature_cache: auto)
        img = train_stage(load_config(args.config, list(args.set) + ["train.epochs=1", "train.feature_cache=null"]),
                          data, f"{work}/img")
        img_wall = time.perf_counter() - t
        t = time.perf_counter()
        cached = train_stage(cfg, data, f"{work}/cached", feature_cache=f"{work}/cache")
        cached_wall = time.perf_counter() - t
        rows = [json.loads(line) for line in open(f"{work}/cached/metrics.jsonl")]
        img_epoch = img["last"]["train_time_s"]
        cache_epoch = rows[-1]["train_time_s"]  # epoch 2: the cache already in memory
        backbone_ips = _backbone_images_per_s(build_model(cfg).to(resolve_device(cfg.train.device)), cfg,
                                              resolve_device(cfg.train.device))
        report = {
            "config": args.config, "data": data, "n_train": img["n_train"], "image_size": cfg.train.image_size,
            "threads": torch.get_num_threads(),
            "epoch_from_images_s": round(img_epoch, 2), "epoch_from_cache_s": round(cache_epoch, 2),
            "speedup": round(img_epoch / cache_epoch, 1),
            # process CPU seconds: the fair comparison on a shared machine (wall time includes other jobs)
            "epoch_from_images_cpu_s": round(img["last"]["train_cpu_s"], 2),
            "epoch_from_cache_cpu_s": round(rows[-1]["train_cpu_s"], 2),
            "speedup_cpu": round(img["last"]["train_cpu_s"] / rows[-1]["train_cpu_s"], 2),
            # validation (embeds train + val every epoch): from images vs from the cache
            "val_from_images_s": round(img["last"]["val_time_s"], 2),
            "val_from_cache_s": round(rows[-1]["val_time_s"], 2),
            "epoch_plus_val_speedup": round((img_epoch + img["last"]["val_time_s"])
                                            / (cache_epoch + rows[-1]["val_time_s"]), 2),
            "cache_build_plus_2_epochs_wall_s": round(cached_wall, 1), "image_run_1_epoch_wall_s": round(img_wall, 1),
            "train_img_per_s_images": round(img["last"]["img_per_s"], 1),
            "train_img_per_s_neck_head_from_cache": round(rows[-1]["img_per_s"], 1),
            "backbone_forward_only_img_per_s": round(backbone_ips, 1),
        }
        print(json.dumps(report, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", nargs="?", default="speed", choices=("speed", "quality"))
    p.add_argument("--config", default=default_config())
    p.add_argument("--data", default=DEFAULT_DATA)
    p.add_argument("--out", default="/tmp/lgff-bench-train-quality")
    p.add_argument("--feature-cache", default=None)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    (cmd_quality if args.command == "quality" else cmd_speed)(args)


if __name__ == "__main__":
    main()
