"""Model vs frozen-backbone GeM baseline for a preset on a real sample set, from the feature cache (run by hand).

    python bench/preset_quality.py --config lgffem_cpu --data /tmp/lgff-samples/histolytics-nuclei \
        [--set k=v ...] [--splits val,test] [--cache DIR] [--out DIR]

Trains one stage with `train_stage` (feature cache shared between runs under --cache), then ranks the whole train
split for every query of each split in --splits (exact cosine) with the best checkpoint and with the baseline (same
frozen backbone, GeM p=model.baseline_gem_p on the last level, same image size), both computed from cached
backbone features. Prints one JSON line: Recall@1/5/10 and mAP per split for model and baseline. Choose settings
on `val`; look at `test` only for the chosen one.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "2")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from lgff_core.evaluate import metrics  # noqa: E402
from lgff_core.config import load_config  # noqa: E402
from lgff_core.data.shards import read_manifest  # noqa: E402
from lgff_core.data.transforms import eval_transform  # noqa: E402
from lgff_core.models import build_baseline  # noqa: E402
from lgff_core.train import train_stage  # noqa: E402
from lgff_core.train.checkpoint import backbone_weights_id, load_model_from_checkpoint  # noqa: E402
from lgff_core.train.feature_cache import build_feature_cache, cache_key, dataset_fingerprint  # noqa: E402
from lgff_core.device import frozen_backbone_precision, resolve_device  # noqa: E402
from lgff_core.train.embedding import _iter_split_batches  # noqa: E402


def split_cache(model, cfg, data: str, split: str, cache_dir: str):
    """The trainer's own feature cache of `split` (same key), built here for splits the trainer does not cache."""
    device = next(model.parameters()).device
    precision = frozen_backbone_precision(cfg, device)
    manifest = read_manifest(data)
    n = int(manifest.split_counts.get(split, 0))
    dc = dict(model.backbone.data_config)
    key, digest = cache_key(dataset_fingerprint(data), cfg.model.backbone.name, str(backbone_weights_id(model, cfg)),
                            cfg.train.image_size, dc.get("crop_pct"), split, precision.name)

    def extract(images):
        with torch.no_grad(), precision.autocast():
            return [f.float().contiguous() for f in model.forward_features(images.to(device))]

    tf = eval_transform(dc, cfg.train.image_size)
    return build_feature_cache(extract, lambda: _iter_split_batches(data, split, tf, 64, manifest),
                               cache_dir, key, digest, n)


@torch.no_grad()
def descriptors(head, cache, device) -> np.ndarray:
    out = [head(cache.batch(np.arange(i, min(i + 128, len(cache))), device)) for i in range(0, len(cache), 128)]
    return F.normalize(torch.cat(out).float(), dim=1).cpu().numpy()


def scores(xq, yq, xb, yb) -> dict:
    ranked = np.concatenate([yb[I] for _, I, _ in metrics.full_ranking(xq, xb)])
    num_relevant = np.array([(yb == y).sum() for y in yq])
    out = {f"R@{k}": round(metrics.recall_at_k(yq, ranked, k), 4) for k in (1, 5, 10)}
    out["mAP"] = round(metrics.mean_average_precision(ranked == yq[:, None], num_relevant), 4)
    out["P@10"] = round(metrics.precision_at_k(yq, ranked, 10), 4)
    out["mMV@5"] = round(metrics.majority_vote_at_k(yq, ranked, 5), 4)
    # Recall@k of a random ranking (depends only on class prevalence in the database): the floor Recall@5/10 sit on
    n_db = len(yb)
    out["R@10_chance"] = round(float(np.mean([1 - np.prod([(n_db - r - i) / (n_db - i) for i in range(10)])
                                              for r in num_relevant])), 4)
    # misses at 10 whose ten neighbours all share one (wrong) label: the query sits inside another class's cluster
    miss = ~(ranked[:, :10] == yq[:, None]).any(axis=1)
    pure = np.array([len(set(row.tolist())) == 1 for row in ranked[:, :10]])
    out["miss@10_in_one_wrong_cluster"] = round(float((miss & pure).sum() / max(1, miss.sum())), 4)
    out["R@10_per_class"] = {int(c): round(float((~miss)[yq == c].mean()), 4) for c in np.unique(yq)}
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="lgffem_cpu")
    p.add_argument("--data", required=True)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--splits", default="val")
    p.add_argument("--cache", default="/tmp/lgff-bench-cache")
    p.add_argument("--tag", default="", help="free label copied into the JSON line")
    p.add_argument("--out", default=None, help="training output (default: a temporary directory, removed)")
    args = p.parse_args(argv)
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    cfg = load_config(args.config, args.set)
    device = resolve_device(cfg.train.device)
    out = args.out or tempfile.mkdtemp(prefix="lgff-preset-quality-")
    t0 = time.perf_counter()
    try:
        summary = train_stage(cfg, args.data, out, feature_cache=args.cache)
        model, _ = load_model_from_checkpoint(os.path.join(out, "best"), device=device)
    finally:
        if args.out is None:
            shutil.rmtree(out, ignore_errors=True)
    baseline = build_baseline(cfg).to(device).eval()
    db = split_cache(model, cfg, args.data, cfg.train.train_split, args.cache)
    result = {"config": args.config, "set": args.set, "data": os.path.basename(args.data.rstrip("/")), "tag": args.tag,
              "best_epoch": summary["best_epoch"], "train_s": round(time.perf_counter() - t0, 1)}
    model.eval()
    model_db, base_db = descriptors(model.forward_head, db, device), descriptors(baseline.forward_head, db, device)
    for split in args.splits.split(","):
        q = split_cache(model, cfg, args.data, split, args.cache)
        result[split] = {"model": scores(descriptors(model.forward_head, q, device), q.labels, model_db, db.labels),
                         "baseline": scores(descriptors(baseline.forward_head, q, device), q.labels, base_db,
                                            db.labels)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
