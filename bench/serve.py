"""Search service benchmark: requests/s, p50 and p95 latency at 1, 16 and 200 concurrent clients, and the server's
peak RSS, for `lgff serve` started from a given source tree (so today's code and a checkout of an older commit run
the same client).

The queries are images of the dataset the index was built from, one per request (round robin), so every reply can be
checked: its first hit should be the query itself ("wrong" counts the others: duplicate images in the data
set tie, and the lower database position wins). The client is asyncio over raw HTTP/1.1 keep-alive connections (one
per concurrent client), light enough to share the machine with the server. Peak RSS is the server's VmHWM, reset
before each level (/proc/PID/clear_refs), read after it. The server's CPU time per request (all its threads, from
/proc/PID/stat) is the measure that a busy machine distorts least: req/s depends on the share of the cores the
server gets, which on a shared host changes from run to run (the 1-minute load average is recorded with each level).

    python bench/serve.py --model runs/demo/.../train/model/best --index IDX --config demo \\
        [--src /tmp/lgff-old] [--label before] [--set serve.max_batch=32 ...] [--out bench/results/serve.json]

Issue 19's goal: at least 3x the throughput of the pre-batching service at 200 concurrent clients.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def query_images(index_uri: str, n: int) -> list[tuple[str, str]]:
    """(sample_id, base64 image) of the first `n` rows of the indexed dataset."""
    sys.path.insert(0, str(ROOT))
    from lgff_core.data.shards import read_table

    meta = json.loads(Path(index_uri, "index.json").read_text())
    t = read_table(meta["source"], columns=["sample_id", "image"]).slice(0, n)
    return [(sid, base64.b64encode(img).decode("ascii"))
            for sid, img in zip(t.column("sample_id").to_pylist(), (b.as_py() for b in t.column("image")))]


def _abs(uri: str) -> str:
    return uri if "://" in uri else str(Path(uri).resolve())


class Server:
    def __init__(self, args, port: int):
        src = str(Path(args.src).resolve())
        env = dict(os.environ, PYTHONPATH=src)
        cmd = [sys.executable, "-m", "lgff_core", *args.server_flags, "serve", "--model", _abs(args.model),
               "--index", _abs(args.index), "--host", "127.0.0.1", "--port", str(port)]
        if args.config:
            cmd += ["--config", str(Path(args.config).resolve()) if Path(args.config).is_file() else args.config]
        for kv in args.set or []:
            cmd += ["--set", kv]
        self.log = open(args.log, "wb") if args.log else subprocess.DEVNULL
        # run from the source tree: `python -m` puts the working directory ahead of PYTHONPATH
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=self.log, cwd=src)
        self.port = port

    def wait_ready(self, name: str, seconds: float = 300) -> None:
        import urllib.request

        deadline = time.time() + seconds
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"server exited with {self.proc.returncode}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/v1/models/{name}", timeout=5) as r:
                    if json.loads(r.read()).get("ready"):
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise SystemExit("server not ready")

    def reset_peak(self) -> None:
        try:
            Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")
        except OSError:
            pass

    def peak_rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process so far (all its threads)."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def _request(reader, writer, port: int, path: str, body: bytes) -> tuple[int, bytes]:
    writer.write(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    length = next(int(v) for k, _, v in (ln.partition(":") for ln in lines[1:]) if k.strip().lower() == "content-length")
    return status, await reader.readexactly(length)


async def run_level(port: int, path: str, queries, concurrency: int, total: int) -> dict:
    """`total` requests from `concurrency` clients; latency per request, wall time of the whole level."""
    latencies: list[float] = []
    wrong = [0]
    failed = [0]
    next_i = [0]

    async def client():
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=2**24)
        try:
            while next_i[0] < total:
                i = next_i[0]
                next_i[0] += 1
                sid, b64 = queries[i % len(queries)]
                body = json.dumps({"instances": [{"image": {"b64": b64}}]}).encode()
                t0 = time.perf_counter()
                status, reply = await _request(reader, writer, port, path, body)
                latencies.append(time.perf_counter() - t0)
                if status != 200:
                    failed[0] += 1
                elif json.loads(reply)["predictions"][0]["hits"][0]["sample_id"] != sid:
                    wrong[0] += 1
        finally:
            writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    lat = np.array(latencies)
    return {"concurrency": concurrency, "requests": total, "seconds": round(wall, 2),
            "req_per_s": round(total / wall, 1), "p50_ms": round(float(np.percentile(lat, 50)) * 1000, 1),
            "p95_ms": round(float(np.percentile(lat, 95)) * 1000, 1), "failed": failed[0], "wrong": wrong[0]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--index", required=True)
    p.add_argument("--config", default=None)
    p.add_argument("--set", action="append", help="server config override (repeatable)")
    p.add_argument("--src", default=str(ROOT), help="source tree the server runs from (default: this one)")
    p.add_argument("--label", default="after")
    p.add_argument("--levels", default="1,16,200")
    p.add_argument("--requests", default="150,600,1200", help="requests per level")
    p.add_argument("--model-name", default="lgff")
    p.add_argument("--log", default=None, help="server log file")
    p.add_argument("--verbose-server", dest="server_flags", action="store_const", const=["-vv"], default=["-q"],
                   help="server logs at debug level (batch sizes and timings) instead of warnings only")
    p.add_argument("--out", default=None, help="append the result (JSON line) here")
    args = p.parse_args(argv)

    levels = [int(c) for c in args.levels.split(",")]
    totals = [int(n) for n in args.requests.split(",")]
    queries = query_images(args.index, 256)
    port = _free_port()
    server = Server(args, port)
    rows = []
    try:
        server.wait_ready(args.model_name)
        path = f"/v1/models/{args.model_name}:predict"
        asyncio.run(run_level(port, path, queries, 4, 40))  # warm-up
        for c, n in zip(levels, totals):
            server.reset_peak()
            load, cpu0 = os.getloadavg()[0], server.cpu_seconds()
            row = asyncio.run(run_level(port, path, queries, c, n))
            row["server_cpu_ms_per_req"] = round((server.cpu_seconds() - cpu0) / n * 1000, 1)
            row["peak_rss_mb"] = round(server.peak_rss_mb(), 1)
            row["load_avg_1m"] = round(load, 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        server.stop()
    result = {"label": args.label, "src": str(args.src), "sets": args.set or [], "cpus": os.cpu_count(),
              "levels": rows}
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(result) + "\n")
    print(f"\n{args.label}: concurrency | req/s | p50 ms | p95 ms | server CPU ms/req | peak RSS MB | failed | "
          "wrong | load avg")
    for r in rows:
        print(f"  {r['concurrency']:>4} | {r['req_per_s']:>6} | {r['p50_ms']:>7} | {r['p95_ms']:>7} | "
              f"{r['server_cpu_ms_per_req']:>6} | {r['peak_rss_mb']:>7} | {r['failed']} | {r['wrong']} | "
              f"{r['load_avg_1m']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
