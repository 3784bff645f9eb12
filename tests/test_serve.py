"""The search service (`lgff serve`, KServe v1 protocol) on 127.0.0.1: 50 requests, some malformed, from 4 client
threads; every valid request gets the right hits, every malformed one a 4xx, and the server stays up."""
from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from lgff_core.data.shards import read_table

from search_support import TINY_SET, build_index_for, make_checkpoint
from test_train_support import make_dataset

pytestmark = pytest.mark.slow  # model + index + a server process (~60 s on 2 cores)

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url, body: bytes, timeout=60):
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"}, method="POST")
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read()), time.perf_counter() - t0
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}"), time.perf_counter() - t0


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    data = make_dataset(str(root / "data"), n_per_class=(6, 2, 2), rows_per_group=4)
    ckpt = make_checkpoint(str(root / "ckpt"))
    idx = build_index_for(ckpt, data, str(root / "emb"), str(root / "idx"))
    port = _free_port()
    sets = [a for kv in TINY_SET + ["serve.max_instances=4", "serve.max_image_bytes=20000", "serve.k=3"]
            for a in ("--set", kv)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    log = open(root / "server.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "lgff_core", "-q", "serve", "--model", ckpt, "--index", idx,
                             "--host", "127.0.0.1", "--port", str(port), *sets], stdout=log, stderr=log, env=env)
    base = f"http://127.0.0.1:{port}/v1/models/lgff"
    deadline = time.time() + 180
    while True:
        assert proc.poll() is None, (root / "server.log").read_text()
        try:
            with urllib.request.urlopen(base, timeout=5) as r:
                if json.loads(r.read()).get("ready"):
                    break
        except OSError:
            pass
        assert time.time() < deadline, "server not ready in 180 s"
        time.sleep(0.5)
    yield {"proc": proc, "base": base, "data": data, "log": root / "server.log"}
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def test_50_requests_4_threads_valid_answered_malformed_4xx_server_alive(server):
    t = read_table(server["data"], columns=["sample_id", "image"])
    ids, images = t.column("sample_id").to_pylist(), [b.as_py() for b in t.column("image")]
    b64 = [base64.b64encode(im).decode("ascii") for im in images]
    requests = []  # (body, expected first-hit ids or None for malformed)
    malformed = [
        b"not json at all",
        json.dumps({"inputs": []}).encode(),
        json.dumps({"instances": []}).encode(),
        json.dumps({"instances": [{"image": {"b64": b64[0]}}] * 5}).encode(),  # > max_instances
        json.dumps({"instances": [{"image": {"b64": "%%%not-base64%%%"}}]}).encode(),
        json.dumps({"instances": [{"image": {"b64": base64.b64encode(b"plain text").decode()}}]}).encode(),
        json.dumps({"instances": [{"image": {"b64": "A" * 30000}}]}).encode(),  # > max_image_bytes
        json.dumps({"instances": [{"img": b64[0]}]}).encode(),
        json.dumps({"instances": [{"image": {"b64": b64[1][: len(b64[1]) // 2 // 4 * 4]}}]}).encode(),  # truncated
        json.dumps([1, 2, 3]).encode(),
    ]
    rng = np.random.default_rng(0)
    for i in range(50):
        if i % 4 == 3:
            requests.append((malformed[(i // 4) % len(malformed)], None))
        else:
            pick = rng.choice(len(ids), size=int(rng.integers(1, 4)), replace=False)
            body = json.dumps({"instances": [{"image": {"b64": b64[p]}} for p in pick]}).encode()
            requests.append((body, [ids[p] for p in pick]))
    url = server["base"] + ":predict"
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda r: _post(url, r[0]), requests))
    lat_ok = []
    for (body, expected), (status, reply, seconds) in zip(requests, results):
        if expected is None:
            assert 400 <= status < 500, (body[:80], status, reply)
            assert "\n" not in reply.get("error", "x") and reply.get("error"), reply
        else:
            assert status == 200, (status, reply)
            preds = reply["predictions"]
            assert [p["hits"][0]["sample_id"] for p in preds] == expected
            assert all(abs(p["hits"][0]["score"] - 1.0) < 1e-5 and len(p["hits"]) == 3 for p in preds)
            assert set(preds[0]["hits"][0]) == {"sample_id", "label", "label_name", "group", "score"}
            lat_ok.append(seconds)
    assert server["proc"].poll() is None, server["log"].read_text()[-2000:]
    with urllib.request.urlopen(server["base"], timeout=10) as r:  # still ready
        assert json.loads(r.read())["ready"] is True
    all_lat = [r[2] for r in results]
    print(f"\nserve latency over {len(results)} requests (4 threads): p50 {np.percentile(all_lat, 50) * 1000:.0f} ms, "
          f"p95 {np.percentile(all_lat, 95) * 1000:.0f} ms; valid only ({len(lat_ok)}): "
          f"p50 {np.percentile(lat_ok, 50) * 1000:.0f} ms, p95 {np.percentile(lat_ok, 95) * 1000:.0f} ms")
