"""`lgff serve`: the search service (KServe custom predictor, v1 protocol) over a model and an index.

  lgff serve --model CKPT --index IDX --port 8080 [--host 0.0.0.0]
  curl localhost:8080/v1/models/lgff                                    readiness
  curl -d '{"instances": [{"image": {"b64": "..."}}]}' localhost:8080/v1/models/lgff:predict

Answers {"predictions": [{"hits": [{sample_id, label, label_name, group, score}, ...]}]} (the records of
`lgff search`); bad requests get a 400 with a one-line reason. Limits: config section `serve`.
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
    p.add_argument("--host", default="0.0.0.0", help="address to bind (127.0.0.1 for local use only)")
    add_config_args(p)
    p.set_defaults(func=_serve)


def _serve(args) -> int:
    from ..retrieval.serve import serve

    check_model_args(args)
    serve(args.model, args.index, load_args_config(args), host=args.host, port=args.port, baseline=args.baseline,
          weights=args.weights)
    return 0
