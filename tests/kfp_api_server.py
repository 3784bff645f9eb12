"""A recording stand-in for the Kubeflow Pipelines v2beta1 REST API, on 127.0.0.1, for tests that drive the real
``kfp.Client`` (and so the SDK's own request building: caching overrides, runtime config, auth headers).

It answers the calls `lgff pipeline submit|schedule` make and keeps every request (method, path, query, headers,
JSON body) so a test can assert what a real API server would have received:

    GET  /apis/v2beta1/healthz                  {"commit_sha", "tag_name", "multi_user"} (the release under test)
    GET  /apis/v2beta1/experiments?filter=...   the experiments created so far whose display_name matches
    POST /apis/v2beta1/experiments              creates one (experiment_id exp-N)
    POST /apis/v2beta1/runs                     records the run (run_id run-N)
    POST /apis/v2beta1/recurringruns            records the recurring run (recurring_run_id job-N)
    POST /apis/v2beta1/pipelines/upload         records the uploaded package (pipeline_id pipeline-N)

Anything else is a 404 with a JSON error, as the real server answers unknown routes. Use the `kfp_api` fixture::

    from kfp_api_server import kfp_api  # noqa: F401  (fixture)

    def test_x(kfp_api):
        kfp_api.tag_name = "2.16.1"
        ... lgff pipeline submit ... --host kfp_api.url
        (run,) = kfp_api.bodies("POST", "/apis/v2beta1/runs")
"""
from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional
from urllib.parse import parse_qs, urlsplit

import pytest

API = "/apis/v2beta1"
MAX_BODY = 64 * 1024 * 1024  # a compiled pipeline is a few hundred KB; bound what one request may send


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: Any  # parsed JSON, raw bytes for non-JSON bodies, None when empty


@dataclass
class KfpApi:
    """State of the stand-in server: what it answers (healthz fields) and what it received."""

    url: str = ""
    tag_name: str = "2.17.0"
    commit_sha: str = "0000000"
    multi_user: bool = False
    requests: list[Request] = field(default_factory=list)
    experiments: list[dict[str, Any]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def bodies(self, method: str, path: str) -> list[Any]:
        """JSON bodies of the requests received for `method` `path` (path without the query), oldest first."""
        return [r.body for r in self.requests if r.method == method and r.path == path]

    def calls(self) -> list[tuple[str, str]]:
        return [(r.method, r.path) for r in self.requests]

    # ---------------------------------------------------------------------------------------------- answers
    def answer(self, req: Request) -> tuple[int, dict[str, Any]]:
        with self._lock:
            self.requests.append(req)
            n = len(self.requests)
            route = (req.method, req.path)
            if route == ("GET", f"{API}/healthz"):
                return 200, {"commit_sha": self.commit_sha, "tag_name": self.tag_name, "multi_user": self.multi_user,
                             "pipeline_store": "database"}
            if route == ("GET", f"{API}/experiments"):
                return 200, self._list_experiments(req)
            if route == ("POST", f"{API}/experiments"):
                exp = dict(req.body or {}, experiment_id=f"exp-{n}", storage_state="AVAILABLE")
                self.experiments.append(exp)
                return 200, exp
            if route == ("POST", f"{API}/runs"):
                return 200, dict(req.body or {}, run_id=f"run-{n}", state="PENDING")
            if route == ("POST", f"{API}/recurringruns"):
                return 200, dict(req.body or {}, recurring_run_id=f"job-{n}", status="ENABLED")
            if route == ("POST", f"{API}/pipelines/upload"):
                name = req.query.get("name", ["pipeline"])[0]
                return 200, {"pipeline_id": f"pipeline-{n}", "display_name": name}
            return 404, {"error": f"no route {req.method} {req.path}", "code": 5}

    def _list_experiments(self, req: Request) -> dict[str, Any]:
        wanted = None
        if "filter" in req.query:
            for pred in json.loads(req.query["filter"][0]).get("predicates", []):
                if pred.get("key") == "display_name":
                    wanted = pred.get("stringValue", pred.get("string_value"))
        namespace = req.query.get("namespace", [None])[0]
        found = [e for e in self.experiments if (wanted is None or e.get("display_name") == wanted)
                 and (namespace is None or e.get("namespace") == namespace)]
        return {"experiments": found, "total_size": len(found)} if found else {}


def _handler(api: KfpApi):
    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            parts = urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY:
                self._reply(413, {"error": "request too large"})
                return
            raw = self.rfile.read(length) if length else b""
            body: Optional[Any] = None
            if raw:
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = raw
            req = Request(self.command, parts.path, parse_qs(parts.query),
                          {k.lower(): v for k, v in self.headers.items()}, body)
            self._reply(*api.answer(req))

        def _reply(self, status: int, payload: dict[str, Any]) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_DELETE = do_PATCH = _serve

        def log_message(self, *args) -> None:  # keep pytest output clean
            pass

    return Handler


@pytest.fixture
def kfp_api():
    """A fresh recording KFP API on 127.0.0.1 (an ephemeral port) for one test; stopped afterwards."""
    api = KfpApi()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(api))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    api.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield api
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
