"""Search service: a KServe custom predictor answering the v1 protocol with the hits of each query image.

    GET  /v1/models/<name>            readiness ({"name": ..., "ready": true} once model + index are loaded)
    POST /v1/models/<name>:predict    {"instances": [{"image": {"b64": "<base64 PNG or JPEG>"}}, ...]}
                                      -> {"predictions": [{"hits": [{sample_id, label, label_name, group, score}]}]}

Hit records are those of `lgff search` (results.json), from the same `Searcher` (query embedded as the embed stage
does). The model and the index are loaded from URIs once, at start. Bad requests get HTTP 400 with a one-line
``{"error": ...}`` (`kserve.errors.InvalidInput`): not a JSON object, no / too many instances (``serve.max_instances``),
not base64, base64 text above ``serve.max_image_bytes``, not a decodable image, more than ``serve.max_image_pixels``
pixels (checked from the header, before decoding). The search runs in a worker thread, so the event loop keeps
answering readiness probes during a long request.

`kserve` is imported lazily: importing ``kserve.model_server`` parses ``sys.argv`` with its own flags (e.g.
``--config`` would match its ``--configure_logging``), so it is imported with an empty argument list.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import io
import logging
import sys
from typing import Optional

from ..config import LGFFConfig
from ..errors import LGFFError

logger = logging.getLogger(__name__)

__all__ = ["import_kserve", "make_predictor", "serve"]


def import_kserve():
    """The `kserve` module (imported with an empty argv, see the module docstring)."""
    argv = sys.argv
    sys.argv = argv[:1]
    try:
        import kserve
        import kserve.errors  # noqa: F401
        import kserve.protocol.rest.server  # noqa: F401
    except ImportError as exc:
        raise LGFFError(f"the search service needs the kserve package ({exc}); pip install kserve") from None
    finally:
        sys.argv = argv
    return kserve


def make_predictor(model_uri: Optional[str], index_uri: str, cfg: LGFFConfig, baseline: Optional[str] = None,
                   weights: Optional[str] = None):
    """A `kserve.Model` named ``serve.model_name`` (not loaded yet: call ``.load()``)."""
    kserve = import_kserve()
    from kserve.errors import InvalidInput
    from PIL import Image

    from .search import Searcher, public_hit

    limits = cfg.serve

    class LGFFSearchModel(kserve.Model):
        def __init__(self) -> None:
            super().__init__(limits.model_name)
            self.searcher: Optional[Searcher] = None

        def load(self) -> bool:
            self.searcher = Searcher(model_uri, index_uri, cfg, baseline, weights=weights)
            self.ready = True
            logger.info("serving %s over %s (%d images)", self.searcher.embedder.name, index_uri,
                        self.searcher.bundle.index.ntotal)
            return self.ready

        @staticmethod
        def decode_instances(payload) -> list[bytes]:
            if not isinstance(payload, dict) or not isinstance(payload.get("instances"), list):
                raise InvalidInput('expected a JSON object {"instances": [{"image": {"b64": ...}}, ...]}')
            instances = payload["instances"]
            if not instances:
                raise InvalidInput("instances is empty")
            if len(instances) > limits.max_instances:
                raise InvalidInput(f"{len(instances)} instances, at most {limits.max_instances} per request")
            images = []
            for i, inst in enumerate(instances):
                b64 = inst.get("image", {}).get("b64") if isinstance(inst, dict) and isinstance(
                    inst.get("image"), dict) else None
                if not isinstance(b64, str):
                    raise InvalidInput(f'instances[{i}]: expected {{"image": {{"b64": "<base64 PNG or JPEG>"}}}}')
                if len(b64) > limits.max_image_bytes:
                    raise InvalidInput(f"instances[{i}]: image is {len(b64)} base64 bytes, "
                                       f"at most {limits.max_image_bytes}")
                try:
                    data = base64.b64decode(b64, validate=True)
                except (binascii.Error, ValueError):
                    raise InvalidInput(f"instances[{i}]: image.b64 is not valid base64") from None
                try:
                    with Image.open(io.BytesIO(data)) as im:
                        w, h = im.size
                        if w * h > limits.max_image_pixels:
                            raise InvalidInput(f"instances[{i}]: image is {w}x{h} pixels, "
                                               f"at most {limits.max_image_pixels}")
                        im.load()
                except InvalidInput:
                    raise
                except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad bytes
                    raise InvalidInput(f"instances[{i}]: not a decodable image ({type(exc).__name__})") from None
                images.append(data)
            return images

        def search(self, images: list[bytes]) -> dict:
            hits = self.searcher.search(images, min(limits.k, self.searcher.bundle.index.ntotal))
            return {"predictions": [{"hits": [public_hit(h) for h in row]} for row in hits]}

        async def predict(self, payload, headers=None, response_headers=None) -> dict:
            images = self.decode_instances(payload)
            return await asyncio.get_running_loop().run_in_executor(None, self.search, images)

    return LGFFSearchModel()


def serve(model_uri: Optional[str], index_uri: str, cfg: LGFFConfig, host: str = "0.0.0.0", port: int = 8080,
          baseline: Optional[str] = None, weights: Optional[str] = None) -> None:
    """Load, then serve until SIGINT / SIGTERM (KServe's REST server; gRPC off)."""
    kserve = import_kserve()
    from kserve.constants.constants import FASTAPI_APP_IMPORT_STRING
    from kserve.protocol.rest.server import RESTServer

    predictor = make_predictor(model_uri, index_uri, cfg, baseline, weights)
    predictor.load()
    server = kserve.ModelServer(http_port=port, enable_grpc=False, workers=1)
    server.register_model(predictor)
    # ModelServer.start() binds 0.0.0.0 only; the REST server it would start, with the host chosen here
    rest = RESTServer(FASTAPI_APP_IMPORT_STRING, server.dataplane, server.model_repository_extension, port,
                      workers=1)
    rest.config.host = host
    logger.info("listening on http://%s:%d/v1/models/%s", host, port, predictor.name)
    rest.run()
