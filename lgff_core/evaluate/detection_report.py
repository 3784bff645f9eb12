"""Detection reports (Markdown + self-contained HTML) from `lgff evaluate detection` outputs.

- `write_single_report(result, out_uri)`: one model: COCO metrics (bbox, segm), per-image counts, overlays.
- `write_detection_report(metrics_uris, out_uri)`: the necks side by side in the layout of the thesis's Table 5.3
  (neck parameters counted with the per-level stem, AP / AP50 / AP75 for bbox and segm) plus s/iter of training,
  with the thesis's own EfficientNetV2-M COCO figures as a reference row (not comparable with small CPU runs).
"""
from __future__ import annotations

import base64
import html
import math
from typing import Optional, Sequence
from urllib.parse import quote

from .. import storage
from ..errors import DataError
from .report import md_text

__all__ = ["write_single_report", "write_detection_report", "THESIS_TABLE_5_3", "table_rows"]

# Thesis Table 5.3 (COCO, EfficientNetV2-M backbone, 1x schedule): neck (+ stem) params, AP bbox, AP segm
THESIS_TABLE_5_3 = [
    {"model": "thesis BiFPN (EfficientNetV2-M, COCO)", "params": "2.2M", "bbox_AP": 0.2050, "segm_AP": 0.0416},
    {"model": "thesis LGFFDM (EfficientNetV2-M, COCO)", "params": "9.6M", "bbox_AP": 0.2470, "segm_AP": 0.0433},
]
COLUMNS = ["model", "neck + stem params", "AP bbox", "AP50 bbox", "AP75 bbox", "AP segm", "AP50 segm", "AP75 segm",
           "s/iter (train)"]


def _f(v: Optional[float]) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"


def _params(n: int) -> str:
    return f"{math.floor(n / 1e5) / 10:.1f}M ({n:,})"  # truncated to 0.1M, as the thesis reports


def table_rows(results: Sequence[dict]) -> list[list[str]]:
    rows = []
    for r in results:
        s_iter = r.get("train", {}).get("s_per_iter")
        rows.append([str(r.get("model")), _params(r["params"]["neck+stem"]),
                     *(_f(r["bbox"].get(k)) for k in ("AP", "AP50", "AP75")),
                     *(_f(r["segm"].get(k)) for k in ("AP", "AP50", "AP75")),
                     "-" if s_iter is None else f"{s_iter:.2f}"])
    for t in THESIS_TABLE_5_3:
        rows.append([t["model"], t["params"], _f(t["bbox_AP"]), "-", "-", _f(t["segm_AP"]), "-", "-", "-"])
    return rows


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(md_text(h) for h in header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(md_text(c) for c in r) + " |" for r in rows]) + "\n"


def _md_image(rel: str) -> str:
    return f"![{md_text(rel)}]({quote(rel)})\n"


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table border='1' cellspacing='0' cellpadding='4'><tr>{head}</tr>{body}</table>"


def _page(title: str, body: str) -> str:
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head>"
            f"<body style='font-family:sans-serif'><h1>{html.escape(title)}</h1>{body}</body></html>\n")


def _metrics_rows(r: dict) -> list[list[str]]:
    keys = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR")
    return [[t] + [_f(r[t].get(k)) for k in keys] for t in ("bbox", "segm")]


def _images(r: dict, base_uri: str, fig_prefix: str, copy_to: Optional[str]) -> list[tuple[str, bytes]]:
    out = []
    for name in r.get("overlays", []):
        png = storage.read_bytes(storage.join(base_uri, name))
        rel = f"{fig_prefix}{storage.basename(name)}"
        if copy_to is not None:
            storage.write_bytes(storage.join(copy_to, rel), png)
        out.append((rel, png))
    return out


def write_single_report(result: dict, out_uri: str) -> dict:
    """report.md + report.html for one `evaluate detection` result whose overlays lie under `out_uri`."""
    title = f"LGFFDM detection: {result.get('model')} on {result.get('split')}"
    info = (f"{result['n_images']} images, {result['n_gt']} ground-truth instances; COCOeval maxDets "
            f"{result['max_dets']}; neck {result.get('neck')} on {result.get('backbone')}: neck + stem "
            f"{_params(result['params']['neck+stem'])}")
    header = ["iou", "AP", "AP50", "AP75", "APs", "APm", "APl", "AR"]
    count_keys = [k for k in result["per_image"][0] if k not in ("image_id",)] if result["per_image"] else []
    counts = [[str(p[k]) for k in count_keys] for p in result["per_image"]]
    images = _images(result, out_uri, "overlays/", None)
    md = [f"# {md_text(title)}\n", md_text(info) + "\n", _md_table(header, _metrics_rows(result)), "\n## Per image\n",
          _md_table(count_keys, counts), "\n## Predicted masks\n"] + [_md_image(n) for n, _ in images]
    figs = "".join(f"<img src='data:image/png;base64,{base64.b64encode(p).decode()}' width='400'>" for _, p in images)
    body = (f"<p>{html.escape(info)}</p>{_html_table(header, _metrics_rows(result))}<h2>Per image</h2>"
            f"{_html_table(count_keys, counts)}<h2>Predicted masks</h2>{figs}")
    storage.write_text(storage.join(out_uri, "report.md"), "".join(md))
    storage.write_text(storage.join(out_uri, "report.html"), _page(title, body))
    return {"html": storage.join(out_uri, "report.html"), "md": storage.join(out_uri, "report.md")}


def write_detection_report(metrics_uris: Sequence[str], out_uri: str,
                           title: str = "LGFFDM: LGFFN-D vs BiFPN (Table 5.3 layout)") -> dict:
    """The necks side by side (module docstring); `metrics_uris` are `evaluate detection` outputs."""
    from .report import load_metrics

    if not metrics_uris:
        raise DataError("no metrics files given")
    results, bases = [], []
    for uri in metrics_uris:
        data = load_metrics(uri)
        if data.get("kind") != "detection":
            raise DataError(f"{uri}: not a detection metrics file (kind {data.get('kind')!r})")
        results.append(data)
        # a pipeline artifact's metrics.json is a pointer: its overlays lie in the bulk prefix it names
        bulk = (data.get("bulk") or {}).get("prefix")
        bases.append(bulk or (str(uri)[: -len("/metrics.json")] if str(uri).endswith("metrics.json") else str(uri)))
    out_uri = str(out_uri).rstrip("/")
    rows = table_rows(results)
    note = ("Neck parameters are counted with the per-level stem and truncated to 0.1M, as the thesis does. "
            "The thesis rows are COCO 2017 after 12 epochs on a GPU with an EfficientNetV2-M backbone; runs here "
            "(other data, backbone, image size and schedule) are not comparable with them in absolute terms.")
    splits = ", ".join(sorted({f"{r['split']} ({r['n_images']} images, {r['n_gt']} instances, maxDets "
                               f"{r['max_dets']})" for r in results}))
    md = [f"# {md_text(title)}\n\n", f"Evaluated on: {md_text(splits)}\n\n", _md_table(COLUMNS, rows), f"\n{note}\n"]
    body = [f"<p>Evaluated on: {html.escape(splits)}</p>", _html_table(COLUMNS, rows), f"<p>{html.escape(note)}</p>"]
    for i, (r, base) in enumerate(zip(results, bases)):
        images = _images(r, base, f"figures/{i}-", out_uri)
        md.append(f"\n## {md_text(r['model'])}\n\n"
                  + _md_table(["iou", "AP", "AP50", "AP75", "APs", "APm", "APl", "AR"], _metrics_rows(r)))
        md += [_md_image(n) for n, _ in images]
        body.append(f"<h2>{html.escape(str(r['model']))}</h2>" + _html_table(
            ["iou", "AP", "AP50", "AP75", "APs", "APm", "APl", "AR"], _metrics_rows(r)) + "".join(
            f"<img src='data:image/png;base64,{base64.b64encode(p).decode()}' width='320'>" for _, p in images))
    storage.write_text(storage.join(out_uri, "report.md"), "".join(md))
    storage.write_text(storage.join(out_uri, "report.html"), _page(title, "".join(body)))
    return {"html": storage.join(out_uri, "report.html"), "md": storage.join(out_uri, "report.md"), "rows": rows}
