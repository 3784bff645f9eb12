"""`lgff serve`: the search service (KServe v1 protocol) over a model and an index.

  lgff serve --model CKPT --index IDX [--port 8080] [--host 127.0.0.1]
  curl localhost:8080/v1/models/lgff                                     readiness
  curl -H 'Content-Type: application/json' -d '{"instances": [{"image": {"b64": "..."}}]}' \\
       localhost:8080/v1/models/lgff:predict

Answers {"predictions": [{"hits": [{sample_id, label, label_name, group, score}, ...]}]} (the records of
`lgff search`); a refused request gets a 4xx with a one-line reason. Only JSON bodies are accepted (curl -d alone
sends a form, answered 415). It listens on 127.0.0.1 unless told otherwise: in a pod, pass --host 0.0.0.0 (the
manifest in manifests/serving/ does). A new version of the index (`lgff index build/add/remove --out IDX`) is picked
up within serve.index_poll_s seconds. Limits, batching: config section `serve`.
"""
from __future__ import annotations

import argparse

from . import add_config_args, load_args_config
from .search import add_model_args, check_model_args


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="search service over HTTP (KServe v1 protocol)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 in a container)")
    add_config_args(p)
    p.set_defaults(func=_serve)


def _serve(args) -> int:
    from ..retrieval.serve import serve

    check_model_args(args)
    cfg = load_args_config(args)  # a bad setting fails here, before anything is loaded
    serve(args.model, args.index, cfg, host=args.host, port=args.port, baseline=args.baseline, weights=args.weights)
    return 0
