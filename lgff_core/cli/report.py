"""`lgff report`: one self-contained HTML + Markdown comparing evaluated runs, model vs baseline (lgff_core.evaluate.report);
detection metrics (`lgff evaluate detection`) get the necks side by side in Table 5.3's layout (report_detection).

  lgff report --metrics model/metrics.json baseline/metrics.json --out REPORT_DIR
"""
from __future__ import annotations

import argparse

from . import add_config_args


def register(subparsers) -> None:
    p = subparsers.add_parser("report", help="HTML + Markdown report (model vs baseline, charts, example queries)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--metrics", required=True, nargs="+", action="extend",
                   help="metrics JSON URIs from `lgff evaluate` (or directories holding metrics.json); repeatable")
    p.add_argument("--out", required=True, help="report directory (report.html, report.md, figures/) or a .html path")
    p.add_argument("--title", default="LGFF retrieval report")
    p.add_argument("--examples", type=int, default=6, help="example queries shown per run")
    p.add_argument("--link", action="append", default=[], metavar="TITLE=URI",
                   help="link a related page from the report (e.g. the explain stage's explain.html); repeatable")
    add_config_args(p)
    p.set_defaults(func=_report)


def _report(args) -> int:
    from ..evaluate.report import load_metrics, write_report

    if any(load_metrics(uri).get("kind") == "detection" for uri in args.metrics):
        from ..evaluate.detection_report import write_detection_report

        title = args.title if args.title != "LGFF retrieval report" else "LGFFDM: LGFFN-D vs BiFPN (Table 5.3 layout)"
        out = write_detection_report(args.metrics, args.out, title=title)
        print(f"detection report ({len(out['rows'])} rows) -> {out['html']}")
        return 0

    from ..errors import LGFFError

    links = []
    for item in args.link:
        title, sep, uri = item.partition("=")
        if not sep or not title or not uri:
            raise LGFFError(f"--link {item!r}: expected TITLE=URI")
        links.append((title, uri))
    out = write_report(args.metrics, args.out, title=args.title, n_query_examples=args.examples, links=links)
    print(f"report ({len(out['figures'])} figures, baseline: {out['baseline'] or 'none'}) -> {out['html']}")
    return 0
