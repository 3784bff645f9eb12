"""``python -m tests.kfp_launcher PIPELINE.yaml --pipeline-root s3://... [--executor subprocess|docker]``: run a
compiled pipeline under the launcher contract and print the per-task table (bytes moved, seconds, cache status).

Exit codes: 0 success, 1 a task failed, 2 bad input or an IR feature the runner does not implement."""
from __future__ import annotations

import argparse
import sys

from .driver import LATEST_BACKEND
from .runner import EXECUTORS, TaskFailed, UnsupportedFeature, run_pipeline


def _pairs(items: list[str], what: str) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"error: {what} {item!r}: expected KEY=VALUE")
        out[key] = value
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.kfp_launcher", description=__doc__.split("\n\n")[0])
    ap.add_argument("package", help="compiled pipeline YAML")
    ap.add_argument("--pipeline-root", help="the run's runtime config pipeline_root, s3://bucket/prefix (default: the "
                    "--launcher-config defaultPipelineRoot, else minio://mlpipeline/v2/artifacts; never the spec's)")
    ap.add_argument("--launcher-config", action="append", default=[],
                    help="KEY=VALUE of the namespace's kfp-launcher ConfigMap, e.g. defaultPipelineRoot=s3://b/root")
    ap.add_argument("--backend-version", default=LATEST_BACKEND,
                    help=f"KFP backend whose version-dependent driver rules apply (default {LATEST_BACKEND})")
    ap.add_argument("--executor", choices=EXECUTORS, default="subprocess")
    ap.add_argument("--image", help="image every task runs in (docker executor)")
    ap.add_argument("--cache", help="JSON cache file (artifact ids + executions); a rerun with it hits the cache")
    ap.add_argument("--arg", action="append", default=[], help="pipeline argument NAME=VALUE (JSON for non-strings)")
    ap.add_argument("--env", action="append", default=[], help="NAME=VALUE given to every task")
    ap.add_argument("--secret", action="append", default=[],
                    help="SECRET.KEY=VALUE: a fake Kubernetes secret key for secretAsEnv")
    ap.add_argument("--s3-endpoint", help="object store the launcher uses (default: $AWS_ENDPOINT_URL)")
    ap.add_argument("--run-id")
    ap.add_argument("--keep-sandboxes", action="store_true", help="keep each task's temp directory")
    args = ap.parse_args(argv)
    secrets: dict[str, dict[str, str]] = {}
    for ref, value in _pairs(args.secret, "--secret").items():
        name, dot, key = ref.partition(".")
        if not dot:
            raise SystemExit(f"error: --secret {ref!r}: expected SECRET.KEY=VALUE")
        secrets.setdefault(name, {})[key] = value
    try:
        result = run_pipeline(args.package, pipeline_root=args.pipeline_root,
                              launcher_config=_pairs(args.launcher_config, "--launcher-config") or None,
                              backend_version=args.backend_version, arguments=_pairs(args.arg, "--arg"),
                              executor=args.executor, image=args.image, cache_path=args.cache,
                              env=_pairs(args.env, "--env"), secrets=secrets, run_id=args.run_id,
                              s3_endpoint=args.s3_endpoint, keep_sandboxes=args.keep_sandboxes)
    except TaskFailed as e:
        print(e.result.summary_table())
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (UnsupportedFeature, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(result.summary_table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
