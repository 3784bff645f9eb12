"""Search service (`lgff serve`): the KServe v1 protocol over a model and an index, and nothing else.

    GET  /                           liveness: {"status": "alive"}
    GET  /v1/models/<name>           readiness: 200 {"name", "ready": true} while the model and an index holding
                                     images are loaded; 503 {"name", "ready": false, "error"} otherwise
    POST /v1/models/<name>:predict   {"instances": [{"image": {"b64": "<base64 PNG or JPEG>"}}, ...]}
                                     -> {"predictions": [{"hits": [{sample_id, label, label_name, group, score}]}]}

Every other path answers 404 (405 for a wrong method): no model repository (load / unload), no v2 protocol, no
docs or metrics pages. The app is a plain Starlette application run by uvicorn, the stack KServe's own model server
is built on; KServe's `ModelServer` itself is not used because it always mounts the v2 and repository endpoints
(anyone could unload the model) and reads a whole body before any limit applies. An InferenceService runs this
container as a custom predictor (manifests/serving/). ``serve.model_name`` names the model in the paths.

Hit records are those of `lgff search` (results.json), from the same `Searcher`: a query goes through the embed
stage's decode, eval transform and forward pass, so an indexed image finds itself first with cosine 1.0.

A predict request, in order; each refusal is one line ``{"error": ...}`` without a path or a traceback:

1. Content-Type application/json (case and parameters aside; a charset other than UTF-8 is refused), else 415.
   A browser sends a form-encoded or text/plain body to another origin without asking first (a CORS "simple
   request"); requiring JSON makes it ask.
2. Body bytes (``serve.max_body_mb``): a larger Content-Length is answered 413 before the body is read, and a
   streamed body 413 as soon as it passes the limit.
3. In a thread pool (the event loop keeps answering probes): JSON, then the instances (at most
   ``serve.max_instances``, each at most ``serve.max_image_bytes`` of base64), then each image's header: pixels
   (``serve.max_image_pixels``) and long / short side (``serve.max_aspect_ratio``) before a pixel is decoded;
   then decode + transform. Any failure: 400.
4. Micro-batching: a free model thread (``serve.model_threads`` of them) takes the inputs of every waiting request
   (up to ``serve.max_batch`` images, waiting at most ``serve.max_wait_ms`` for more), runs one forward pass and
   one faiss search, and answers each request its rows. On the demo model a batch of 32 costs ~5 ms of CPU per
   image against ~30 ms for a batch of one (bench/serve.py).

Index versions: the service answers from the version it loaded (the id map's file is held open, so a rebuild that
deletes that version's files does not break it) and reads index.json every ``serve.index_poll_s`` seconds; a new
version is loaded beside the old one and swapped in between two batches. A version that does not load is logged and
the loaded one kept. An emptied index (every id removed) makes the service not ready (503) until a version with
images is published.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import io
import json
import logging
import os
import queue
import socket
import threading
import time
from typing import Callable, Optional

from ..config import LGFFConfig, ServeConfig
from ..errors import LGFFError

logger = logging.getLogger(__name__)

__all__ = ["RequestError", "check_content_type", "parse_instances", "check_image_header", "prepare_queries",
           "QueryBatcher", "SearchService", "make_app", "serve"]

MB = 1_000_000
QUERY_FORMATS = ("PNG", "JPEG", "TIFF", "BMP", "WEBP")
_STOP = object()  # queued by QueryBatcher.close
INTERNAL_ERROR = "internal error while searching (details in the service log)"


class RequestError(Exception):
    """A refused request: an HTTP status and a one-line reason that is safe to send (no path, no traceback)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


# ------------------------------------------------------------------------------------------------ request checks


def check_content_type(value: Optional[str]) -> None:
    media, _, params = (value or "").partition(";")
    if media.strip().lower() != "application/json":
        shown = (value or "none")[:60]
        raise RequestError(415, f"Content-Type must be application/json, got {shown!r} "
                                "(curl: -H 'Content-Type: application/json')")
    for param in params.split(";"):
        key, _, val = param.partition("=")
        if key.strip().lower() == "charset" and val.strip().strip('"').lower() not in ("utf-8", "utf8"):
            raise RequestError(415, f"JSON must be UTF-8, got charset {val.strip()[:20]!r}")


async def read_body(request, limit: int) -> bytearray:
    """The request body, refused (413) from its Content-Length or as soon as the stream passes `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise RequestError(400, "Content-Length is not a number")
        if int(declared) > limit:
            raise RequestError(413, f"body is {int(declared)} bytes, at most {limit} (serve.max_body_mb)")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise RequestError(413, f"body is over {limit} bytes (serve.max_body_mb)")
    return body


def parse_instances(body: bytes | bytearray, limits: ServeConfig) -> list[bytes]:
    """The encoded images of a v1 predict body."""
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise RequestError(400, "body is not valid JSON") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("instances"), list):
        raise RequestError(400, 'expected a JSON object {"instances": [{"image": {"b64": ...}}, ...]}')
    instances = payload["instances"]
    if not instances:
        raise RequestError(400, "instances is empty")
    if len(instances) > limits.max_instances:
        raise RequestError(400, f"{len(instances)} instances, at most {limits.max_instances} per request")
    images = []
    for i, inst in enumerate(instances):
        image = inst.get("image") if isinstance(inst, dict) else None
        b64 = image.get("b64") if isinstance(image, dict) else None
        if not isinstance(b64, str):
            raise RequestError(400, f'instances[{i}]: expected {{"image": {{"b64": "<base64 PNG or JPEG>"}}}}')
        if len(b64) > limits.max_image_bytes:
            raise RequestError(400, f"instances[{i}]: image is {len(b64)} base64 bytes, "
                                    f"at most {limits.max_image_bytes}")
        try:
            images.append(base64.b64decode(b64, validate=True))
        except (binascii.Error, ValueError):
            raise RequestError(400, f"instances[{i}]: image.b64 is not valid base64") from None
    return images


def check_image_header(data: bytes, i: int, limits: ServeConfig) -> None:
    """Size limits from the image header, before any pixel is decoded.

    The eval transform scales the short side to the model's input size, so a 1 x 100000 image would grow to
    100000 x size^2 pixels: the aspect ratio is bounded as well as the pixel count."""
    from PIL import Image

    from ..data.images import describe_error

    try:
        # only the formats of query files (`lgff search`): no format whose plugin runs an external program (EPS)
        with Image.open(io.BytesIO(data), formats=QUERY_FORMATS) as im:
            w, h = im.size
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad bytes
        raise RequestError(400, f"instances[{i}]: not a decodable {', '.join(QUERY_FORMATS)} image "
                                f"({describe_error(exc)})") from None
    if w * h > limits.max_image_pixels:
        raise RequestError(400, f"instances[{i}]: image is {w}x{h} pixels, at most {limits.max_image_pixels}")
    if min(w, h) < 1 or max(w, h) > limits.max_aspect_ratio * min(w, h):
        raise RequestError(400, f"instances[{i}]: image is {w}x{h} pixels, the long side may be at most "
                                f"{limits.max_aspect_ratio:g} x the short side (serve.max_aspect_ratio)")


def prepare_queries(body: bytes | bytearray, limits: ServeConfig, to_input: Callable):
    """A predict body -> the (n, 3, S, S) model input of its images (runs in a worker thread)."""
    import torch

    images = parse_instances(body, limits)
    for i, data in enumerate(images):
        check_image_header(data, i, limits)
    inputs = []
    for i, data in enumerate(images):
        try:
            inputs.append(to_input(data))
        except LGFFError:  # decode_image's one-line DataError: damaged or truncated pixel data
            raise RequestError(400, f"instances[{i}]: not a decodable image (damaged or truncated data)") from None
        images[i] = None  # the encoded bytes are no longer needed
    return torch.stack(inputs)


# ------------------------------------------------------------------------------------------------ micro-batching


class QueryBatcher:
    """Model threads for the queries of all requests.

    `submit` queues one request's inputs (n, 3, S, S) and returns a future of its n result rows. A free model thread
    takes the first waiting request, then every other one that arrives within `max_wait_s` while the batch holds
    fewer than `max_batch` images, and calls `run` once on them all. A request larger than `max_batch` runs alone.
    `workers` threads run batches side by side (one forward pass each, the model shared: inference only), which uses
    several cores without torch's intra-op threads, whose spinning barriers collapse on a busy or CPU-limited host.
    At most `depth` requests wait: `submit` blocks beyond that, which holds back the decoders, not the event loop.
    """

    def __init__(self, run: Callable, max_batch: int, max_wait_s: float, depth: int, workers: int = 1):
        self._run = run
        self._max_batch = max_batch
        self._max_wait_s = max_wait_s
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._threads = [threading.Thread(target=self._loop, name=f"lgff-model-{i}", daemon=True)
                         for i in range(workers)]
        for t in self._threads:
            t.start()

    def submit(self, inputs) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put((inputs, future))
        return future

    def close(self) -> None:
        for _ in self._threads:
            self._queue.put(_STOP)
        for t in self._threads:
            t.join(timeout=30)

    def _loop(self) -> None:
        carry = None  # a request taken from the queue that did not fit in the last batch
        while True:
            first, carry = (carry if carry is not None else self._queue.get()), None
            if first is _STOP:
                return
            batch, n = [first], len(first[0])
            deadline = time.monotonic() + self._max_wait_s
            while n < self._max_batch:
                try:
                    item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if item is _STOP or n + len(item[0]) > self._max_batch:
                    carry = item
                    break
                batch.append(item)
                n += len(item[0])
            self._answer(batch)

    def _answer(self, batch: list) -> None:
        import torch

        live = [(x, f) for x, f in batch if f.set_running_or_notify_cancel()]
        if not live:
            return
        try:
            rows = self._run(torch.cat([x for x, _ in live]) if len(live) > 1 else live[0][0])
        except BaseException as exc:  # noqa: BLE001 - every waiting request gets the failure
            for _, f in live:
                f.set_exception(exc)
            return
        start = 0
        for x, f in live:
            f.set_result(rows[start:start + len(x)])
            start += len(x)


# ------------------------------------------------------------------------------------------------ the service


def _version_key(meta: dict) -> str:
    return json.dumps({k: v for k, v in meta.items() if k != "uri"}, sort_keys=True, default=str)


class SearchService:
    """A `Searcher` behind the batcher and the decoders, swapped for a new index version when one is published."""

    def __init__(self, searcher, cfg: LGFFConfig):
        from .search import query_transform

        self.cfg = cfg
        self.limits = cfg.serve
        self.searcher = searcher
        self._loaded = _version_key(searcher.bundle.meta)
        self._failed: Optional[str] = None
        self._to_input = query_transform(searcher.embedder)
        self.decoders = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1)),
                                                              thread_name_prefix="lgff-decode")
        self.batcher = QueryBatcher(self._search, self.limits.max_batch, self.limits.max_wait_ms / 1000.0,
                                    depth=self.limits.max_batch, workers=self.limits.model_threads)
        self._stop = threading.Event()
        self._watcher = None
        if self.limits.index_poll_s > 0:
            self._watcher = threading.Thread(target=self._watch, name="lgff-index-watch", daemon=True)
            self._watcher.start()

    @classmethod
    def load(cls, model_uri: Optional[str], index_uri: str, cfg: LGFFConfig, baseline: Optional[str] = None,
             weights: Optional[str] = None) -> "SearchService":
        from .search import Searcher

        searcher = Searcher(model_uri, index_uri, cfg, baseline, weights=weights)
        logger.info("serving %s over %s (version %s, %d images)", searcher.embedder.name, index_uri,
                    searcher.bundle.meta.get("version"), searcher.bundle.index.ntotal)
        return cls(searcher, cfg)

    def not_ready(self) -> Optional[str]:
        """Why the service cannot answer a query now (None when it can)."""
        if self.searcher.bundle.index.ntotal == 0:
            return "the index holds no images (every id removed); publish a version with images"
        return None

    def prepare(self, body) -> concurrent.futures.Future:
        """Decoder thread: body -> model input, queued for the model thread."""
        return self.batcher.submit(prepare_queries(body, self.limits, self._to_input))

    def _search(self, inputs) -> list[list[dict]]:
        """Model thread: one forward pass and one faiss search for a batch, on one index version."""
        from .embed import embed_images
        from .search import public_hit

        searcher = self.searcher
        ntotal = searcher.bundle.index.ntotal
        if ntotal == 0:
            raise RequestError(503, self.not_ready())
        t0 = time.perf_counter()
        xq = embed_images(searcher.embedder, inputs)
        t1 = time.perf_counter()
        D, I = searcher.search_vectors(xq, min(self.limits.k, ntotal))
        rows = [[public_hit(h) for h in row] for row in searcher.hits(D, I)]
        logger.debug("batch of %d queries: forward %.0f ms, search %.0f ms", len(inputs), 1000 * (t1 - t0),
                     1000 * (time.perf_counter() - t1))
        return rows

    def check_index(self) -> bool:
        """Load and swap in the published version when it is not the served one; True when swapped."""
        from ..index import load_index, read_manifest

        uri = self.searcher.index_uri
        try:
            key = _version_key(read_manifest(uri))
        except LGFFError as exc:
            logger.warning("cannot read the manifest of %s (%s); still serving version %s", uri, exc,
                           self.searcher.bundle.meta.get("version"))
            return False
        if key in (self._loaded, self._failed):
            return False
        try:
            bundle = load_index(uri)
            searcher = self.searcher.with_index(bundle)
        except LGFFError as exc:
            self._failed = key
            logger.warning("%s: the published version does not load (%s); still serving version %s", uri, exc,
                           self.searcher.bundle.meta.get("version"))
            return False
        self.searcher, self._loaded, self._failed = searcher, _version_key(bundle.meta), None
        logger.info("%s: now serving version %s (%d images)", uri, bundle.meta.get("version"), bundle.index.ntotal)
        return True

    def _watch(self) -> None:
        while not self._stop.wait(self.limits.index_poll_s):
            try:
                self.check_index()
            except Exception:  # noqa: BLE001 - the watcher must outlive any one failed check
                logger.exception("index check failed; still serving the loaded version")

    def close(self) -> None:
        self._stop.set()
        self.batcher.close()
        self.decoders.shutdown(wait=False, cancel_futures=True)


# ------------------------------------------------------------------------------------------------ HTTP


def make_app(service: SearchService):
    """The Starlette app: liveness, readiness and predict of ``serve.model_name``; nothing else."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    name = service.limits.model_name
    max_body = service.limits.max_body_mb * MB

    def error(status: int, message: str) -> JSONResponse:
        # after a 413 the rest of the body is not wanted: closing the connection stops uvicorn reading it
        return JSONResponse({"error": message}, status_code=status,
                            headers={"Connection": "close"} if status == 413 else None)

    async def live(request):
        return JSONResponse({"status": "alive"})

    async def ready(request):
        reason = service.not_ready()
        if reason:
            return JSONResponse({"name": name, "ready": False, "error": reason}, status_code=503)
        return JSONResponse({"name": name, "ready": True})

    async def predict(request):
        try:
            reason = service.not_ready()
            if reason:
                raise RequestError(503, reason)
            check_content_type(request.headers.get("content-type"))
            body = await read_body(request, max_body)
            queued = await asyncio.get_running_loop().run_in_executor(service.decoders, service.prepare, body)
            del body
            rows = await asyncio.wrap_future(queued)
        except RequestError as exc:
            return error(exc.status, str(exc))
        except Exception:  # noqa: BLE001 - logged here; the client gets no detail (paths, internals)
            logger.exception("predict failed")
            return error(500, INTERNAL_ERROR)
        return JSONResponse({"predictions": [{"hits": row} for row in rows]})

    async def not_found(request, exc):
        return error(404, f"no such endpoint; this service answers GET /v1/models/{name} and "
                          f"POST /v1/models/{name}:predict")

    async def wrong_method(request, exc):
        return error(405, f"method {request.method} is not allowed here")

    async def internal(request, exc):
        logger.error("unhandled error: %s", type(exc).__name__)
        return error(500, INTERNAL_ERROR)

    routes = [Route("/", live, methods=["GET"]),
              Route(f"/v1/models/{name}", ready, methods=["GET"]),
              Route(f"/v1/models/{name}:predict", predict, methods=["POST"])]
    return Starlette(routes=routes, exception_handlers={404: not_found, 405: wrong_method, Exception: internal})


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (not listening yet): a taken port fails before the model is loaded."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        raise LGFFError(f"cannot listen on {host}:{port} ({exc.strerror or exc})") from None
    return sock


def serve(model_uri: Optional[str], index_uri: str, cfg: LGFFConfig, host: str = "127.0.0.1", port: int = 8080,
          baseline: Optional[str] = None, weights: Optional[str] = None) -> None:
    """Load, then serve until SIGINT / SIGTERM (uvicorn, one process)."""
    import uvicorn

    sock = bind(host, port)
    service = SearchService.load(model_uri, index_uri, cfg, baseline, weights)
    config = uvicorn.Config(make_app(service), log_config=None, lifespan="off", timeout_graceful_shutdown=30)
    logger.info("listening on http://%s:%d/v1/models/%s", host, port, cfg.serve.model_name)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        service.close()
        sock.close()
