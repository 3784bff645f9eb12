"""Embedding benchmark: images/s of the LGFF model relative to the GeM baseline (same backbone weights, same batch),
and peak memory of `lgff embed` for two dataset sizes (it must not grow with the dataset).

Each measurement runs `lgff_core.retrieval.embed.embed_dataset` in a fresh subprocess (so ru_maxrss is that run's peak) over a
synthetic shard dataset (decode + transform + forward + Parquet write: the real stage). The LGFF neck/head are
randomly initialised (speed does not depend on trained values). Goal (issue 5): ratio >= 0.8.

    python bench/embed.py                                 # tf_efficientnet_lite0 (package weights), 224 px
    python bench/embed.py --sizes 128 512 --kinds baseline   # memory check at larger sizes
    python bench/embed.py --set model.backbone.name=convnextv2_base --set model.backbone.weights=none --sizes 16 32
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def make_dataset(uri: str, n: int, size: int = 256, seed: int = 0) -> None:
    from lgff_core.data.images import encode_png
    from lgff_core.data.shards import Manifest, ShardWriter, write_manifest

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    w = ShardWriter(uri, shard_mb=4.0, row_group_mb=1.0)
    for i in range(n):
        phase = rng.uniform(0, 6.28, 3)
        img = np.stack([127 + 100 * np.sin(xx / (9 + 3 * c) + yy / 17 + phase[c]) for c in range(3)], -1)
        img = np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)
        w.write({"sample_id": f"img{i:06d}", "image": encode_png(img), "label": i % 4, "label_name": f"c{i % 4}",
                 "group": f"g{i % 10}", "split": "test", "width": size, "height": size, "source": "synthetic"})
    write_manifest(Manifest(uri=uri, shards=w.close(), label_names=[f"c{c}" for c in range(4)]))


def child(args) -> None:
    """One embedding run; prints a JSON line with the speed and this process's peak RSS."""
    import torch

    torch.set_num_threads(args.threads)
    from lgff_core.config import load_config
    from lgff_core.retrieval.embed import Embedder, embed_dataset, load_embedder, resolve_speed_options

    cfg = load_config(None, [f"embed.batch_size={args.batch}", *args.set])
    if args.kind == "baseline":
        embedder = load_embedder(None, cfg, "gem-last")
    else:
        from lgff_core.models import build_model

        model = build_model(cfg).eval()
        speed = resolve_speed_options(cfg, torch.device("cpu"))
        if speed["channels_last"]:
            model.to(memory_format=torch.channels_last)
        size = cfg.embed.image_size or int(model.backbone.data_config["input_size"][-1])
        embedder = Embedder(model, "lgff-random-init", "bench", size, dict(model.backbone.data_config),
                            torch.device("cpu"), **speed)
    # warm-up batch outside the timed run (oneDNN / bf16 kernel selection)
    from lgff_core.retrieval.embed import embed_images

    embed_images(embedder, torch.randn(args.batch, 3, embedder.image_size, embedder.image_size))
    t0 = time.perf_counter()
    summary = embed_dataset(None, args.data, args.out, cfg, embedder=embedder)
    wall = time.perf_counter() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"kind": args.kind, "rows": summary["rows"], "images_per_s": summary["rows"] / wall,
                      "peak_rss_mb": peak_mb, "bf16": embedder.bf16, "channels_last": embedder.channels_last,
                      "dim": embedder.dim, "image_size": embedder.image_size}))


def forward_gflops(args) -> dict:
    """GFLOP per image of each model's forward (torch FlopCounterMode): the ratio the speed ratio follows."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from lgff_core.config import load_config
    from lgff_core.models import build_baseline, build_model

    cfg = load_config(None, args.set)
    size = cfg.embed.image_size or 224
    out = {}
    for kind, build in (("baseline", build_baseline), ("lgff", build_model)):
        model = build(cfg).eval()
        with torch.inference_mode(), FlopCounterMode(display=False) as fc:
            model(torch.randn(1, 3, size, size))
        out[kind] = fc.get_total_flops() / 1e9
    return out


def run_child(kind: str, data: str, out: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--data", data, "--out", out, "--batch", str(args.batch),
           "--threads", str(args.threads)]
    for s in args.set:
        cmd += ["--set", s]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise SystemExit(f"{kind} run failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs=2, default=[32, 128], help="two dataset sizes (images)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--set", action="append", default=[], help="config override, e.g. model.channels=256")
    ap.add_argument("--kinds", nargs="+", choices=("baseline", "lgff"), default=["baseline", "lgff"],
                    help="models to run (e.g. only baseline for a quick memory check at larger sizes)")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--child", choices=("lgff", "baseline"), help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        args.kind = args.child
        child(args)
        return
    flops = forward_gflops(args)
    print("forward GFLOP / image: " + ", ".join(f"{k} {v:.2f}" for k, v in flops.items())
          + f" (compute ratio baseline/lgff {flops['baseline'] / flops['lgff']:.3f})", flush=True)
    results = {}
    with tempfile.TemporaryDirectory(prefix="lgff-bench-embed-") as tmp:
        for n in args.sizes:
            data = os.path.join(tmp, f"ds{n}")
            make_dataset(data, n)
            for kind in args.kinds:
                r = run_child(kind, data, os.path.join(tmp, f"emb-{kind}-{n}"), args)
                results[f"{kind}/{n}"] = r
                print(f"{kind:8s} {n:6d} images: {r['images_per_s']:7.1f} img/s, peak RSS {r['peak_rss_mb']:7.0f} MB "
                      f"(dim {r['dim']}, {r['image_size']} px, bf16={r['bf16']}, channels_last={r['channels_last']})",
                      flush=True)
    big = max(args.sizes)
    ratio = None
    if len(args.kinds) == 2:
        ratio = results[f"lgff/{big}"]["images_per_s"] / results[f"baseline/{big}"]["images_per_s"]
        print(f"LGFF / baseline images/s at {big} images: {ratio:.2f} "
              f"(goal >= 0.8: {'met' if ratio >= 0.8 else 'not met'})")
    growth = {k: results[f"{k}/{max(args.sizes)}"]["peak_rss_mb"] - results[f"{k}/{min(args.sizes)}"]["peak_rss_mb"]
              for k in args.kinds}
    print(f"peak RSS growth from {min(args.sizes)} to {max(args.sizes)} images: "
          + ", ".join(f"{k} {v:+.0f} MB" for k, v in growth.items()))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "child"},
                                               "results": results, "ratio": ratio, "rss_growth_mb": growth,
                                               "gflops": flops},
                                              indent=1))


if __name__ == "__main__":
    main()
