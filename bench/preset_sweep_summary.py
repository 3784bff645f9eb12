"""Summary of a bench/preset_sweep.sh JSONL: mean over seeds per (setting, dataset) of one split (run by hand).

    python bench/preset_sweep_summary.py bench/results/preset_sweep_h200.jsonl val
    python bench/preset_sweep_summary.py bench/results/preset_sweep_h200.jsonl test cpu-base,cpu-m17wu1k1

Choose on `val`; read `test` only for the chosen settings and the shipped defaults.
"""
import json, sys, collections
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
split = sys.argv[2] if len(sys.argv) > 2 else "val"
only = set(sys.argv[3].split(",")) if len(sys.argv) > 3 else None
g = collections.defaultdict(list)
for r in rows:
    g[(r["tag"], r["data"])].append(r)
for data in ("histolytics-nuclei", "histolytics-tissue"):
    print(f"== {data} [{split}]  model R@1 / mAP (mean over seeds) | baseline R@1 / mAP | R@5 m/b | R@10 m/b | n")
    out = []
    for (tag, d), rs in g.items():
        if d != data or (only and tag not in only):
            continue
        mean = lambda who, k: sum(r[split][who][k] for r in rs) / len(rs)
        out.append((tag, mean("model", "R@1"), mean("model", "mAP"), mean("baseline", "R@1"), mean("baseline", "mAP"),
                    mean("model", "R@5"), mean("baseline", "R@5"), mean("model", "R@10"), mean("baseline", "R@10"),
                    len(rs), [r[split]["model"]["R@1"] for r in rs]))
    for o in sorted(out):
        print(f"{o[0]:14s} {o[1]:.3f} {o[2]:.3f} | {o[3]:.3f} {o[4]:.3f} | {o[5]:.3f} {o[6]:.3f} | {o[7]:.3f} {o[8]:.3f} | {o[9]} {o[10]}")
