"""Archive-scale reindex benchmark: peak memory and wall time of every stage at two archive sizes, in one run.

Synthetic embeddings (clustered, L2-normalised; `--d` dims) are written in the project's embeddings Parquet format,
so no model runs. Each stage runs as its own `lgff` subprocess and is measured from the outside: wall time, the
kernel's peak RSS of that process (`os.wait4` rusage; it also counts memory-mapped pages of inverted lists, which
merge / search / evaluate hand back every `LGFF_RESIDENT_MB`, see lgff_core/index/mapped.py) and the peak anonymous
RSS (RssAnon sampled from /proc every 0.1 s: the memory that cannot be dropped).

Stages: plan (list blocks of `--block-rows` rows; the pipeline's `plan` stage when this checkout has one), index train
(sample of `--train-sample`), add per block (2 parallel workers; at the first size also 1 worker for the speedup),
merge (on-disk lists), search (`--queries` test queries, k=10), evaluate (`--max-queries` stratified sample, k=10).
Exactness (first size): the merged on-disk IVF returns exactly the neighbours of the same IVF built in RAM in one
shot (same trained quantizer, same nprobe).

Goals (issue 10): every stage's peak at the larger size <= 1.2x its peak at the smaller; add on 2 workers >= 1.7x
faster than on 1; exact neighbours.

    python bench/reindex.py --n 100000 400000 --d 512           # quick (a few minutes)
    python bench/reindex.py --n 1000000 4000000 --d 512         # the reported setting (~10 GB of /tmp)
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

N_CLASSES = 24
SHARD_ROWS = 50_000


def write_archive(uri: str, n: int, n_test: int, d: int, seed: int) -> None:
    """n train rows + n_test test rows, shards of SHARD_ROWS, one shard in memory at a time."""
    from lgff_core.data.embeddings import embeddings_to_table, write_embeddings_manifest, write_embeddings_shard

    rng = np.random.default_rng(seed)
    latent = 32
    centers = np.random.default_rng(1234).normal(size=(N_CLASSES, latent)).astype(np.float32)
    proj = (np.random.default_rng(4321).normal(size=(latent, d)) / np.sqrt(latent)).astype(np.float32)
    names = [f"class{c}" for c in range(N_CLASSES)]
    total = n + n_test
    shards = []
    for s, a in enumerate(range(0, total, SHARD_ROWS)):
        b = min(total, a + SHARD_ROWS)
        labels = rng.integers(0, N_CLASSES, b - a)
        z = centers[labels] + 0.6 * rng.normal(size=(b - a, latent)).astype(np.float32)
        x = z @ proj + 0.05 * rng.normal(size=(b - a, d)).astype(np.float32)
        rows = np.arange(a, b)
        table = embeddings_to_table([f"p{r:09d}" for r in rows], labels, [names[c] for c in labels],
                                    [f"slide{r // 5000}" for r in rows], np.where(rows < n, "train", "test"), x)
        name = f"part-{s:05d}.parquet"
        shards.append({"name": name, **write_embeddings_shard(os.path.join(uri, name), table)})
    write_embeddings_manifest(uri, shards, d, names, model="synthetic", source="bench/reindex.py")


def plan_stage(emb: str, block_rows: int, out: str) -> None:
    """Blocks of about `block_rows` selected (train) rows, from the manifest and split columns only."""
    from lgff_core.index import EmbeddingsSource

    n = EmbeddingsSource(emb, "train").num_rows
    blocks = [[a, min(n, a + block_rows)] for a in range(0, n, block_rows)]
    Path(out).write_text(json.dumps({"rows": n, "blocks": blocks}))


def exact_check(trained: str, emb: str, index: str, nq: int, nprobe: int, out: str) -> None:
    """Merged on-disk IVF vs the same IVF built in RAM in one shot (same trained quantizer, same nprobe)."""
    import faiss

    from lgff_core import index as ix
    from lgff_core.index import mapped

    meta = ix.read_manifest(trained)
    base = faiss.read_index(os.path.join(trained, meta["files"]["trained.faiss"]["path"]))
    in_ram = faiss.clone_index(base)
    src = ix.EmbeddingsSource(emb, "train")
    for block in src.blocks():
        in_ram.add(ix.prepare_vectors(block.xb, "ip"))
    queries = ix.EmbeddingsSource(emb, "test").take(np.arange(nq))
    xq = ix.prepare_vectors(queries.xb, "ip")
    ondisk = ix.load_index(index)
    for idx in (in_ram, ondisk.index):
        ix.set_search_params(idx, nprobe=nprobe)
    # the on-disk search runs in rounds of queries (bounded resident lists); the in-RAM one is searched in the same
    # rounds, since the coarse scores faiss adds come from a BLAS product whose rounding depends on the batch
    per_round = mapped.queries_per_round(ondisk.index) or nq
    D1, I1 = (np.concatenate(a) for a in zip(*(ix.search(in_ram, xq[q0:q0 + per_round], 10)
                                               for q0 in range(0, nq, per_round))))
    D2, I2 = ix.search(ondisk.index, xq, 10)
    Path(out).write_text(json.dumps({"queries": nq, "identical_ids": bool(np.array_equal(I1, I2)),
                                     "identical_scores": bool(np.array_equal(D1, D2)),
                                     "mismatched_rows": int((I1 != I2).any(axis=1).sum()),
                                     "max_abs_score_diff": float(np.nanmax(np.abs(D1 - D2))),
                                     "queries_per_round": int(per_round)}))


class Measured:
    """One subprocess: wall time, kernel peak RSS (wait4) and sampled peak RssAnon."""

    def __init__(self, argv: list[str], env: dict):
        self.argv = argv
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.peak_anon_kb = 0
        done = threading.Event()
        sampler = threading.Thread(target=self._sample, args=(proc.pid, done), daemon=True)
        sampler.start()
        # wait4 reports this child's own rusage (RUSAGE_CHILDREN would be the max over every child so far)
        _, status, usage = os.wait4(proc.pid, 0)
        done.set()
        sampler.join()
        self.wall_s = time.perf_counter() - t0
        self.maxrss_mb = usage.ru_maxrss / 1024
        self.cpu_s = usage.ru_utime + usage.ru_stime
        self.anon_mb = self.peak_anon_kb / 1024
        proc.returncode = os.waitstatus_to_exitcode(status)
        self.stdout, self.stderr = proc.stdout.read(), proc.stderr.read()
        if proc.returncode != 0:
            raise SystemExit(f"stage failed ({proc.returncode}): {' '.join(argv)}\n{self.stderr[-3000:]}")

    def _sample(self, pid: int, done: threading.Event) -> None:
        while not done.is_set():
            try:
                with open(f"/proc/{pid}/status") as f:
                    for line in f:
                        if line.startswith("RssAnon:"):
                            self.peak_anon_kb = max(self.peak_anon_kb, int(line.split()[1]))
            except (FileNotFoundError, ProcessLookupError, ValueError):
                pass
            done.wait(0.1)


def lgff(*args: str) -> list[str]:
    return [sys.executable, "-m", "lgff_core", "-q", *args]


def run_size(n: int, args, env: dict, results: dict, first: bool) -> None:
    work = Path(args.workdir) / f"n{n}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    emb, trained, idx = str(work / "emb"), str(work / "trained"), str(work / "index")
    t0 = time.perf_counter()
    Measured([sys.executable, __file__, "--stage", "write", "--emb", emb, "--n", str(n), "--n-test",
              str(args.n_test), "--d", str(args.d)], env)
    print(f"[n={n}] wrote embeddings in {time.perf_counter() - t0:.0f} s", flush=True)
    sets = ["--set", f"index.nprobe={args.nprobe}"]
    res: dict = {}
    plan_out = str(work / "plan.json")
    res["plan"] = Measured([sys.executable, __file__, "--stage", "plan", "--emb", emb, "--block-rows",
                            str(args.block_rows), "--out", plan_out], env)
    blocks = json.loads(Path(plan_out).read_text())["blocks"]
    res["index train"] = Measured(lgff("index", "train", "--embeddings", emb, "--split", "train", "--factory",
                                       args.factory, "--train-sample", str(args.train_sample), "--out", trained,
                                       *sets), env)
    parts = [str(work / f"part{i}") for i in range(len(blocks))]

    def add(i: int) -> Measured:
        a, b = blocks[i]
        return Measured(lgff("index", "add", "--trained", trained, "--embeddings", emb, "--rows", f"{a}:{b}",
                             "--out", parts[i]), env)

    for workers in ([1, 2] if first else [2]):
        t0 = time.perf_counter()
        with ThreadPoolExecutor(workers) as pool:
            adds = list(pool.map(add, range(len(blocks))))
        wall = time.perf_counter() - t0
        res[f"add wall, {workers} worker(s)"] = wall
        print(f"[n={n}] add {len(blocks)} blocks on {workers} worker(s): {wall:.1f} s", flush=True)
    res["add per block"] = adds
    res["merge"] = Measured(lgff("index", "merge", "--trained", trained, "--partials", *parts, "--out", idx), env)
    for p in parts:
        shutil.rmtree(p, ignore_errors=True)
    res["search"] = Measured(lgff("index", "search", "--index", idx, "--queries", emb, "--query-split", "test",
                                  "--k", "10", "--out", str(work / "nb.parquet"), *sets), env)
    res["evaluate"] = Measured(lgff("evaluate", "retrieval", "--embeddings", emb, "--index", idx, "--protocol",
                                    "test-vs-train", "--max-queries", str(args.max_queries), "--out",
                                    str(work / "eval"), "--set", "evaluate.k=10", *sets), env)
    if first:
        out = str(work / "exact.json")
        Measured([sys.executable, __file__, "--stage", "exact", "--trained", trained, "--emb", emb, "--index", idx,
                  "--nq", "1000", "--nprobe", str(args.nprobe), "--out", out], env)
        results["exact"] = json.loads(Path(out).read_text())
    results["metrics"][n] = json.loads((work / "eval" / "metrics.json").read_text())["metrics"]["recall@1"]
    results["index_bytes"][n] = sum(f["size"] for f in json.loads((Path(idx) / "index.json").read_text())["files"].values())
    results["sizes"][n] = res
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


def summarise(results: dict, ns: list[int]) -> dict:
    rows, ratios = [], {}
    stages = ["plan", "index train", "add per block", "merge", "search", "evaluate"]
    for stage in stages:
        cells = []
        for n in ns:
            m = results["sizes"][n][stage]
            if isinstance(m, list):  # add: the largest block, and the summed wall time
                peak = max(m, key=lambda x: x.maxrss_mb)
                cells.append((sum(x.wall_s for x in m), peak.maxrss_mb, max(x.anon_mb for x in m)))
            else:
                cells.append((m.wall_s, m.maxrss_mb, m.anon_mb))
        ratio_rss = cells[-1][1] / cells[0][1]
        ratio_anon = cells[-1][2] / max(cells[0][2], 1e-9)
        ratios[stage] = {"maxrss": ratio_rss, "anon": ratio_anon}
        rows.append((stage, cells, ratio_rss, ratio_anon))
    head = "| stage | " + " | ".join(f"n={n:,}: wall s / peak RSS MB / peak anon MB" for n in ns) + \
           " | RSS ratio | anon ratio |"
    print("\n" + head)
    print("|" + "---|" * (len(ns) + 3))
    for stage, cells, r1, r2 in rows:
        print(f"| {stage} | " + " | ".join(f"{w:.1f} / {r:.0f} / {a:.0f}" for w, r, a in cells)
              + f" | {r1:.2f} | {r2:.2f} |")
    first = results["sizes"][ns[0]]
    speedup = first["add wall, 1 worker(s)"] / first["add wall, 2 worker(s)"]
    cpu = sorted((m.cpu_s for m in first["add per block"]), reverse=True)
    lanes = [0.0, 0.0]
    for c in cpu:  # longest task first onto the less loaded of 2 dedicated cores
        lanes[lanes.index(min(lanes))] += c
    cpu_speedup = sum(cpu) / max(lanes)
    print(f"\nadd speedup, 2 workers vs 1 (n={ns[0]:,}): {speedup:.2f}x measured wall clock on this (shared) machine; "
          f"{cpu_speedup:.2f}x from the tasks' CPU time on 2 dedicated cores (goal >= 1.7)")
    print(f"worst peak ratio n={ns[-1]:,} / n={ns[0]:,}: RSS {max(r['maxrss'] for r in ratios.values()):.2f}, "
          f"anon {max(r['anon'] for r in ratios.values()):.2f} (goal <= 1.2)")
    print(f"exactness (on-disk merged vs in-RAM one-shot IVF, n={ns[0]:,}): {results['exact']}")
    for n in ns:
        print(f"n={n:,}: index files {results['index_bytes'][n] / 2**20:.0f} MiB, recall@1 {results['metrics'][n]:.3f}")
    return {"ratios": ratios, "add_speedup": speedup, "add_speedup_cpu": cpu_speedup}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[100000, 400000], help="archive sizes (train rows)")
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--n-test", type=int, default=10000, help="test rows (queries) in every archive")
    ap.add_argument("--factory", default="IVF1024,SQ8")
    ap.add_argument("--nprobe", type=int, default=16)
    ap.add_argument("--train-sample", type=int, default=100000)
    ap.add_argument("--block-rows", type=int, default=100000, help="rows per add task (pipeline.rows_per_task)")
    ap.add_argument("--max-queries", type=int, default=2000)
    ap.add_argument("--workdir", default="/tmp/lgff-bench-reindex")
    ap.add_argument("--keep", action="store_true", help="keep the files (default: delete each size after it)")
    ap.add_argument("--json", help="also write the raw numbers here")
    # internal: one stage in a subprocess
    ap.add_argument("--stage", choices=("write", "plan", "exact"), help=argparse.SUPPRESS)
    ap.add_argument("--emb", help=argparse.SUPPRESS)
    ap.add_argument("--trained", help=argparse.SUPPRESS)
    ap.add_argument("--index", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--nq", type=int, default=1000, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.stage == "write":
        return write_archive(args.emb, args.n[0], args.n_test, args.d, seed=args.n[0])
    if args.stage == "plan":
        return plan_stage(args.emb, args.block_rows, args.out)
    if args.stage == "exact":
        return exact_check(args.trained, args.emb, args.index, args.nq, args.nprobe, args.out)

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"}
    results: dict = {"sizes": {}, "metrics": {}, "index_bytes": {}}
    t0 = time.perf_counter()
    for i, n in enumerate(args.n):
        run_size(n, args, env, results, first=i == 0)
    summary = summarise(results, args.n)
    print(f"total {time.perf_counter() - t0:.0f} s")
    if args.json:
        def plain(m):
            if isinstance(m, Measured):
                return {"wall_s": m.wall_s, "cpu_s": m.cpu_s, "maxrss_mb": m.maxrss_mb, "anon_mb": m.anon_mb}
            return [plain(x) for x in m] if isinstance(m, list) else m
        raw = {str(n): {k: plain(v) for k, v in s.items()} for n, s in results["sizes"].items()}
        Path(args.json).write_text(json.dumps({"args": vars(args), "sizes": raw, "summary": summary,
                                               "exact": results["exact"]}, indent=2))


if __name__ == "__main__":
    main()
