"""`lgff evaluate retrieval|roxford`: retrieval metrics JSON (lgff_core.evaluate.metrics).

  lgff evaluate retrieval --neighbors N.parquet --protocol test-vs-train --out metrics.json
  lgff evaluate retrieval --embeddings E --protocol leave-one-out --out metrics.json   (exact full ranking: mAP)
  lgff evaluate roxford --gnd gnd_roxford5k.pkl --embeddings E [--queries EQ] --out metrics.json
  lgff evaluate detection --model RUN/best --data COCO_URI --out DIR [--max-dets N] [--split test]
      (COCO bbox + segm AP with pycocotools; DIR gets predictions.json, overlays/, report.md/.html, metrics.json)

Beside metrics.json: per_query.parquet and per_query.csv (one row per query: label, top-1 label, hit@k, AP).
Neighbours that were not searched the way --protocol defines (query split vs database split) are refused.
"""
from __future__ import annotations

import argparse

from . import add_config_args, apply_setting_flags, load_args_config


def _ks(text: str) -> list[int]:
    try:
        ks = [int(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--ks {text!r}: expected comma-separated integers, e.g. 1,5,10") from None
    if not ks:
        raise argparse.ArgumentTypeError(f"--ks {text!r}: expected comma-separated integers, e.g. 1,5,10")
    return ks  # the range is checked with the setting it stands for (evaluate.ks)


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

    d = sub.add_parser("detection", help="COCO AP / AR (bbox, segm) of a trained LGFFDM on a COCO-form dataset")
    d.add_argument("--model", required=True, help="detection checkpoint (a training run's best/ or last/)")
    d.add_argument("--data", required=True, help="COCO-form dataset URI (lgff prep coco, or samples nuclei-coco)")
    d.add_argument("--out", required=True, help="output directory URI")
    d.add_argument("--max-dets", type=int, help="COCOeval maxDets used for AP / AR (default: evaluate.det_max_dets)")
    d.add_argument("--split", help="split evaluated (default: evaluate.det_split)")
    d.add_argument("--label", help="model name in the metrics and reports (default: the checkpoint's config name)")
    add_config_args(d)
    d.set_defaults(func=_detection)


def _fmt(v):
    return "-" if v is None else (f"{100 * v:6.2f}" if isinstance(v, float) else str(v))


def _retrieval(args) -> int:
    from ..evaluate.protocol import evaluate_embeddings, evaluate_neighbours, write_metrics

    cfg = apply_setting_flags(load_args_config(args), args, {
        "k": "evaluate.k", "ks": "evaluate.ks", "max_queries": "evaluate.max_queries",
        "query_batch": "evaluate.query_batch"})
    protocol = args.protocol or cfg.evaluate.protocol
    ks = cfg.evaluate.ks
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
                                     k=cfg.evaluate.k,
                                     exclude_same_group=args.exclude_same_group or cfg.evaluate.exclude_same_group,
                                     ks=ks, mv_k=cfg.evaluate.mv_k, model=args.model, neighbours_out=neighbours_out,
                                     max_queries=cfg.evaluate.max_queries, seed=cfg.seed,
                                     query_batch=cfg.evaluate.query_batch,
                                     max_full_ranking=cfg.evaluate.max_full_ranking,
                                     k_at_scale=cfg.evaluate.k_at_scale, max_in_ram=cfg.index.max_in_ram_vectors)
    written = write_metrics(result, metrics_uri)
    m, ci = result["metrics"], result.get("ci95", {})
    sample = result.get("sample") or {}
    sampled = (f" (seeded sample of {sample['n_queries_total']}, seed {sample['seed']})"
               if sample.get("sampled") else "")
    print(f"{result['model']} / {result.get('protocol_caption', protocol)}: {result['n_queries']} queries{sampled}")
    for key, value in m.items():
        if isinstance(value, float):
            band = f"  95% CI [{_fmt(ci[key][0]).strip()}, {_fmt(ci[key][1]).strip()}]" if key in ci else ""
            print(f"  {key:>12s} {_fmt(value)}{band}")
    print(f"-> {metrics_uri}" + (f" (per query: {written['per_query']['parquet']}, .csv)"
                                 if "per_query" in written else ""))
    return 0


def _roxford(args) -> int:
    from ..evaluate.protocol import evaluate_roxford, write_metrics

    result = evaluate_roxford(args.gnd, args.embeddings, args.queries, model=args.model)
    write_metrics(result, args.out)
    for setup, m in result["metrics"].items():
        print(f"  {setup:>6s} mAP {_fmt(m['map'])}  mP@10 {_fmt(m.get('mp@10'))}")
    print(f"-> {args.out}")
    return 0


def _detection(args) -> int:
    from ..evaluate.detection import evaluate_detection
    from ..evaluate.detection_report import write_single_report

    cfg = apply_setting_flags(load_args_config(args), args, {"max_dets": "evaluate.det_max_dets"})
    result = evaluate_detection(args.model, args.data, args.out, cfg, split=args.split, max_dets=args.max_dets,
                                label=args.label, progress=True)
    write_single_report(result, args.out)
    print(f"{result['model']} on {result['split']}: {result['n_images']} images, {result['n_gt']} instances, "
          f"maxDets {result['max_dets']}")
    for iou_type in ("bbox", "segm"):
        print(f"  {iou_type:>5s} " + "  ".join(f"{k} {_fmt(v)}" for k, v in result[iou_type].items()))
    print(f"-> {args.out}")
    return 0
