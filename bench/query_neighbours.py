"""Per-query view of a preset's model vs its GeM baseline on a sample set (run by hand, issue 14).

    python bench/query_neighbours.py --config lgffem_cpu --data /tmp/lgff-samples/histolytics-tissue \
        --out RUN_DIR [--ckpt best|last] [--set k=v ...] [--splits val,test] [--cache DIR]

Trains into RUN_DIR unless it already holds `best/`, then for model and baseline prints bench/preset_quality.py's
scores per split and the queries with the smallest margin (best same-class minus best other-class cosine against
the train database) with their nearest train items (sample id, label, cosine); writes every query's row to
RUN_DIR/queries-CKPT.json. Read `test` only for a setting already chosen on `val`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from preset_quality import descriptors, scores, split_cache  # noqa: E402

from lgff_core.config import load_config  # noqa: E402
from lgff_core.data import read_table  # noqa: E402
from lgff_core.models import build_baseline  # noqa: E402
from lgff_core.train import train_stage  # noqa: E402
from lgff_core.train.checkpoint import load_model_from_checkpoint  # noqa: E402
from lgff_core.device import resolve_device  # noqa: E402
from lgff_core.train.loop import StopTraining  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="lgffem_cpu")
    p.add_argument("--data", required=True)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--cache", default="/tmp/lgff-bench-cache")
    p.add_argument("--out", required=True)
    p.add_argument("--ckpt", default="best", choices=("best", "last"))
    p.add_argument("--splits", default="val,test")
    p.add_argument("--k", type=int, default=3, help="neighbours shown per query")
    p.add_argument("--stop-after", type=int, default=None, metavar="EPOCH",
                   help="stop training after this epoch of the full schedule (see a given epoch with --ckpt last)")
    args = p.parse_args(argv)
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    cfg = load_config(args.config, args.set)
    device = resolve_device(cfg.train.device)
    if not os.path.isdir(os.path.join(args.out, "best")):
        def stop(row):
            if args.stop_after is not None and row["epoch"] >= args.stop_after:
                raise StopTraining

        summary = train_stage(cfg, args.data, args.out, feature_cache=args.cache, on_epoch_end=stop)
        print(f"trained: best epoch {summary['best_epoch']}")
    model, _ = load_model_from_checkpoint(os.path.join(args.out, args.ckpt), device=device)
    model.eval()
    baseline = build_baseline(cfg).to(device).eval()
    table = read_table(args.data, columns=["sample_id", "split"]).to_pydict()
    ids = {}
    for sid, split in zip(table["sample_id"], table["split"]):
        ids.setdefault(split, []).append(sid)  # dataset order = feature-cache order
    db = split_cache(model, cfg, args.data, cfg.train.train_split, args.cache)
    out = {}
    for name, head in (("model", model.forward_head), ("baseline", baseline.forward_head)):
        xb = descriptors(head, db, device)
        for split in args.splits.split(","):
            q = split_cache(model, cfg, args.data, split, args.cache)
            xq = descriptors(head, q, device)
            print(name, split, json.dumps(scores(xq, q.labels, xb, db.labels)))
            sims = xq @ xb.T
            rows = []
            for i, order in enumerate(np.argsort(-sims, axis=1, kind="stable")):
                same = db.labels == q.labels[i]
                rows.append({"query": ids[split][i], "label": int(q.labels[i]),
                             "hit@1": bool(db.labels[order[0]] == q.labels[i]),
                             "margin": round(float(sims[i][same].max() - sims[i][~same].max()), 4),
                             "neighbours": [(ids[cfg.train.train_split][j], int(db.labels[j]),
                                             round(float(sims[i, j]), 4)) for j in order[:args.k]]})
            out[f"{name}/{split}"] = rows
            for r in sorted(rows, key=lambda r: r["margin"])[:4]:
                print("   ", r["query"], "hit" if r["hit@1"] else "MISS", "margin", r["margin"], r["neighbours"])
    with open(os.path.join(args.out, f"queries-{args.ckpt}.json"), "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
