"""HTML + Markdown report of one or more evaluations: model vs baseline.

Input: metrics JSON files written by `lgff evaluate` (a ``.json`` URI, or a directory / prefix holding
``metrics.json``). The run whose metrics say ``"is_baseline": true`` (model name starting with "baseline", e.g.
"baseline-gem-last", DESIGN.md section 5: frozen backbone + GeM on its last stage) is the baseline; every other run
gets a delta column against it.

Output (``out_uri`` a directory / prefix, or a path ending in ``.html``):
  report.html    self-contained: every figure is a base64 PNG inside the file
  report.md      the same tables; figures referenced as files in ``figures/``
  figures/*.png  per-class top-1 accuracy chart, 2-D projection of each run's embeddings coloured by class
                 (UMAP when `umap` is importable, else PCA via numpy SVD), grid of queries with their top-5 results
                 (thumbnails from the dataset's image bytes, green = same label, red = different) when the metrics
                 record the dataset and neighbours URIs.
Figures use matplotlib's Agg backend (no display needed).
"""
from __future__ import annotations

import base64
import html
import io
import logging
import re
from dataclasses import dataclass, field
from typing import Optional, Sequence
from urllib.parse import quote

import numpy as np

from .. import storage
from ..errors import DataError

logger = logging.getLogger(__name__)

__all__ = ["load_metrics", "write_report", "projection_2d", "RETRIEVAL_ROWS", "md_text", "link_target",
           "LINK_SCHEMES"]

# (key in metrics["metrics"], label) in table order; keys missing from every run are left out
RETRIEVAL_ROWS = [
    ("eta_p", "eta_p"), ("eta_w", "eta_w"), ("eta_tot", "eta_tot"),
    ("recall@1", "Recall@1"), ("recall@5", "Recall@5"), ("recall@10", "Recall@10"),
    ("precision@1", "Precision@1"), ("precision@5", "Precision@5"), ("precision@10", "Precision@10"),
    ("map", "mAP (full ranking)"), ("mmv@5", "mMV@5"),
]


PER_CLASS_FIGURE = "per_class_accuracy.png"


@dataclass
class Run:
    uri: str
    data: dict
    name: str = ""
    is_baseline: bool = False
    figures: dict = field(default_factory=dict)


def load_metrics(uri: str) -> dict:
    """A metrics JSON from a ``.json`` URI or a directory holding ``metrics.json``."""
    path = uri if str(uri).endswith(".json") else storage.join(uri, "metrics.json")
    if not storage.exists(path):
        raise DataError(f"{uri}: no metrics JSON (looked for {path})")
    data = storage.read_json(path)
    if not isinstance(data, dict) or "metrics" not in data:
        raise DataError(f"{path}: not an `lgff evaluate` metrics file (no 'metrics' key)")
    return data


def _run_name(data: dict, i: int) -> str:
    name = str(data.get("model") or f"run{i}")
    if data.get("protocol"):
        name += f" [{data['protocol']}]"
    return name


# ------------------------------------------------------------------------------------------------ figures


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plain_text():
    """Figure text drawn as written: class, run and file names may hold '$', which matplotlib would parse as
    math (and fail on, e.g. '$\\evil$')."""
    import matplotlib

    return matplotlib.rc_context({"text.parse_math": False})


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _plt().close(fig)
    return buf.getvalue()


def projection_2d(x: np.ndarray, seed: int = 0) -> tuple[np.ndarray, str]:
    """(n, 2) coordinates and the method name: UMAP (cosine) when importable, else PCA via SVD."""
    x = np.asarray(x, dtype=np.float64)
    try:
        import umap  # type: ignore

        if len(x) > 15:
            coords = umap.UMAP(n_components=2, metric="cosine", random_state=seed).fit_transform(x)
            return np.asarray(coords), "UMAP"
    except ImportError:
        pass
    centered = x - x.mean(axis=0, keepdims=True)
    _, _, vt = np.linalg.svd(centered, full_matrices=False)
    coords = centered @ vt[:2].T
    # fix the SVD sign ambiguity so the plot is deterministic
    signs = np.sign(coords[np.argmax(np.abs(coords), axis=0), range(coords.shape[1])])
    return coords * np.where(signs == 0, 1, signs), "PCA"


def _per_class_chart(runs: list[Run]) -> Optional[bytes]:
    tables = [(r.name, {row["label"]: row for row in r.data.get("per_class") or []}) for r in runs]
    labels = sorted({lab for _, t in tables for lab in t})
    if not labels:
        return None
    names = {}
    for _, t in tables:
        for lab, row in t.items():
            names.setdefault(lab, row.get("name", str(lab)))
    plt = _plt()
    with _plain_text():
        fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(labels) * max(1, len(runs)) + 2), 3.6))
        width = 0.8 / len(tables)
        xs = np.arange(len(labels))
        for i, (name, t) in enumerate(tables):
            vals = [100 * t[lab]["accuracy"] if lab in t and t[lab]["accuracy"] is not None else np.nan
                    for lab in labels]
            ax.bar(xs + (i - (len(tables) - 1) / 2) * width, vals, width, label=name)
        ax.set_xticks(xs)
        ax.set_xticklabels([str(names[lab]) for lab in labels], rotation=60, ha="right", fontsize=8)
        ax.set_ylabel("top-1 accuracy (%)")
        ax.set_ylim(0, 105)
        ax.set_title("Per-class top-1 accuracy (classes without queries are blank)")
        ax.legend(fontsize=8)
        return _png(fig)


def _projection_figure(run: Run, max_points: int, seed: int) -> Optional[bytes]:
    uri = run.data.get("embeddings")
    if not uri:
        return None
    from ..data.embeddings import read_embeddings

    try:
        emb = read_embeddings(uri)
    except (DataError, OSError) as exc:
        logger.warning("no projection for %s: %s", run.name, exc)
        return None
    if len(emb) < 3:
        return None
    rows = np.arange(len(emb))
    if len(rows) > max_points:
        rows = np.sort(np.random.default_rng(seed).choice(len(rows), max_points, replace=False))
    coords, method = projection_2d(emb.xb[rows], seed)
    labels = emb.labels[rows]
    plt = _plt()
    with _plain_text():
        fig, ax = plt.subplots(figsize=(6, 5))
        cmap = plt.get_cmap("tab20" if len(np.unique(labels)) > 10 else "tab10")
        for j, lab in enumerate(np.unique(labels)):
            sel = labels == lab
            name = emb.label_names[lab] if 0 <= lab < len(emb.label_names) else str(lab)
            ax.scatter(coords[sel, 0], coords[sel, 1], s=8, color=cmap(j % cmap.N), label=name)
        ax.set_title(f"{run.name}: {method} of {len(rows)} embeddings")
        ax.set_xticks([])
        ax.set_yticks([])
        if len(np.unique(labels)) <= 24:
            ax.legend(fontsize=7, markerscale=2, loc="center left", bbox_to_anchor=(1, 0.5))
        return _png(fig)


def _fetch_images(dataset_uri: str, ids: set) -> dict:
    """sample_id -> image bytes for the wanted ids, streaming the dataset one record batch at a time."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from ..data.shards import iter_record_batches

    wanted = pa.array(sorted(ids), pa.string())
    found = {}
    for batch in iter_record_batches(dataset_uri, columns=["sample_id", "image"]):
        mask = pc.is_in(batch.column(0), value_set=wanted)
        if pc.any(mask).as_py():
            sub = batch.filter(mask)
            found.update(zip(sub.column(0).to_pylist(), sub.column(1).to_pylist()))
            if len(found) == len(ids):
                break
    return found


def _query_grid(run: Run, n_queries: int, top: int = 5) -> Optional[bytes]:
    nb_uri, ds_uri = run.data.get("neighbors"), run.data.get("dataset")
    if not nb_uri or not ds_uri:
        return None
    from ..index import read_neighbours

    try:
        table, _ = read_neighbours(nb_uri)
        cols = table.select(["sample_id", "label", "neighbor_ids", "neighbor_labels"]).to_pydict()
        nq = len(cols["sample_id"])
        if nq == 0:
            return None
        pick = sorted(set(np.linspace(0, nq - 1, min(n_queries, nq)).round().astype(int).tolist()))
        ids = set()
        for q in pick:
            ids.add(cols["sample_id"][q])
            ids.update(cols["neighbor_ids"][q][:top])
        images = _fetch_images(ds_uri, ids)
    except (DataError, OSError) as exc:
        logger.warning("no query grid for %s: %s", run.name, exc)
        return None
    label_names = {row["label"]: row.get("name", str(row["label"])) for row in run.data.get("per_class") or []}
    return _grid_png([[(cols["sample_id"][q], cols["label"][q], None)]
                      + [(nid, nlab, nlab == cols["label"][q])
                         for nid, nlab in zip(cols["neighbor_ids"][q][:top], cols["neighbor_labels"][q][:top])]
                      for q in pick], images, label_names, f"{run.name}: queries (left), top-{top} results "
                                                           "(green = same class, red = other)", top)


def _grid_png(rows: list, images: dict, label_names: dict, title: str, top: int, cell: int = 112,
              border: int = 4, caption: int = 14) -> bytes:
    """Thumbnail grid drawn with PIL (one image, cheap): black frame = query, green / red = (in)correct result."""
    from PIL import Image, ImageDraw, ImageOps

    from ..data.images import decode_image

    colors = {None: (0, 0, 0), True: (40, 160, 40), False: (210, 40, 40)}
    w = (top + 1) * (cell + 2 * border) + top * 4 + 8
    h = 24 + len(rows) * (cell + 2 * border + caption + 6)
    canvas = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((6, 6), title, fill=(0, 0, 0))
    y = 24
    for cells in rows:
        x = 4
        for c, (sid, lab, ok) in enumerate(cells):
            name = label_names.get(lab, str(lab))
            text = f"query: {name}" if ok is None else f"#{c} {name} {'ok' if ok else 'x'}"
            draw.text((x, y), text[:22], fill=colors[ok])
            draw.rectangle([x, y + caption, x + cell + 2 * border - 1, y + caption + cell + 2 * border - 1],
                           outline=colors[ok], width=border)
            if sid in images:
                im = ImageOps.contain(decode_image(images[sid]), (cell, cell))  # scales small crops up too
                canvas.paste(im, (x + border + (cell - im.width) // 2, y + caption + border + (cell - im.height) // 2))
            x += cell + 2 * border + 4
        y += cell + 2 * border + caption + 6
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------ escaping

# what a report may link to: web pages, and the storage URIs / paths the pipeline's pages live at; never a scheme
# that runs code in the reader's browser (javascript:, vbscript:, data:)
LINK_SCHEMES = ("http", "https", "s3", "file")
# Markdown that inline text can start: escapes, code, emphasis, strikethrough, math, headings' closing #, table
# cells, raw HTML / autolinks, entities; '_' only at a word edge (inside a word it is literal) and ']' only where
# it would close a link or image ("](", "][")
_MD_SPECIAL = re.compile(r"[\\`*~$#|<&]|(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])|\](?=[(\[])")


def md_text(text) -> str:
    """`text` (a class, run or file name, a title) as literal Markdown inline text on one line."""
    return _MD_SPECIAL.sub(lambda m: "\\" + m.group(0), " ".join(str(text).split()))


def link_target(uri: str, what: str = "link") -> str:
    """`uri` as a link target (percent-encoded where needed); `DataError` for a scheme outside `LINK_SCHEMES`
    or control characters (a browser drops those, so 'java\\tscript:' would run)."""
    text = str(uri).strip()
    if not text or any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        raise DataError(f"{what} {uri!r}: empty, or holds control characters")
    scheme = re.match(r"([A-Za-z][A-Za-z0-9+.-]*):", text)
    if scheme and scheme.group(1).lower() not in LINK_SCHEMES:
        raise DataError(f"{what} {uri!r}: {scheme.group(1)}: links are not allowed (only "
                        f"{', '.join(LINK_SCHEMES)} URIs and paths)")
    return quote(text, safe="/:?#[]@!$&'()*+,;=%~")


# ------------------------------------------------------------------------------------------------ tables


def _pct(v) -> str:
    return "-" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{100 * v:.2f}"


def _delta(v, b) -> str:
    if v is None or b is None:
        return "-"
    return f"{100 * (v - b):+.2f}"


# what each reported number is (shown under the table; formulas in lgff_core/evaluate/metrics.py)
METRIC_DEFINITIONS = [
    ("eta_p", "correct top-1 / queries (Kimia Path24 patch accuracy)"),
    ("eta_w", "mean over classes with queries of their top-1 accuracy"),
    ("eta_tot", "eta_p x eta_w"),
    ("Recall@k", "fraction of queries with at least one same-class item among the top k; with few, large "
                 "classes a random ranking already scores high for k > 1 (3 classes at 10-48% of the database: "
                 "Recall@10 ~ 0.84 by chance), so Recall@5/10 reward class-mixed lists; read them with "
                 "Precision@k and mMV@5"),
    ("Precision@k", "mean over queries of same-class items in the top k, divided by k"),
    ("mAP (full ranking)", "mean over queries of AP = (1/R) sum over ranks r of a relevant item of precision@r; "
                           "R = same-class database items (after exclusions); every database item ranked"),
    ("mAP@k (top-k only)", "AP@k = sum over relevant ranks r <= k of precision@r, divided by min(k, R)"),
    ("mMV@5", "fraction of queries whose majority label among the top 5 is the query's (ties: best-ranked label)"),
    ("95% CI", "percentile bootstrap over queries (1000 resamples, seed 0)"),
]


def _cell(run: Run, key: str) -> str:
    value = run.data["metrics"].get(key)
    ci = (run.data.get("ci95") or {}).get(key)
    if ci and value is not None and all(c is not None for c in ci):
        return f"{_pct(value)} [{_pct(ci[0])}, {_pct(ci[1])}]"
    return _pct(value)


def _retrieval_table(runs: list[Run], baseline: Optional[Run]):
    """pandas DataFrame: one row per metric, one column per run (value and 95% CI), deltas against the baseline."""
    import pandas as pd

    keys = [(k, label) for k, label in RETRIEVAL_ROWS if any(k in r.data["metrics"] for r in runs)]
    # truncated mAP (map_at_K) when no full ranking was available
    extra = sorted({k for r in runs for k in r.data["metrics"] if k.startswith("map_at_")})
    keys += [(k, f"mAP@{k.split('_')[-1]} (top-k only)") for k in extra]
    others = [r for r in runs if r is not baseline]
    table = pd.DataFrame({"metric (%) [95% CI]": [label for _, label in keys] + ["queries", "database searched"]})
    for r in runs:
        table[r.name + (" (baseline)" if r is baseline else "")] = (
            [_cell(r, k) for k, _ in keys] + [str(r.data.get("n_queries", "-")), str(r.data.get("database_size", "-"))])
    if baseline is not None:
        for r in others:
            base = baseline.data["metrics"]
            table[f"Δ {r.name}"] = [_delta(r.data["metrics"].get(k), base.get(k)) for k, _ in keys] + ["", ""]
    return table


def _per_class_table(runs: list[Run]):
    """pandas DataFrame: per class, its queries and each run's top-1 accuracy (%) -- the numbers of the chart."""
    import pandas as pd

    frames = {r.name: pd.DataFrame(r.data["per_class"]).set_index("label") for r in runs if r.data.get("per_class")}
    if not frames:
        return None
    info = pd.concat([f[["name", "n_queries"]] for f in frames.values()])
    info = info[~info.index.duplicated()].sort_index()
    acc = pd.concat({f"{name} top-1 (%)": (100 * f["accuracy"].astype(float)).round(2)
                     for name, f in frames.items()}, axis=1)
    table = info.join(acc).reset_index()
    table["n_queries"] = table["n_queries"].astype(int)
    return table.rename(columns={"name": "class", "n_queries": "queries"})


def _frame_rows(table) -> tuple[list[str], list[list[str]]]:
    return [str(c) for c in table.columns], [["-" if pd_isna(v) else str(v) for v in row]
                                            for row in table.itertuples(index=False)]


def pd_isna(v) -> bool:
    import pandas as pd

    return bool(pd.isna(v)) if not isinstance(v, (list, tuple)) else False


def _sample_note(data: dict) -> str:
    """Which queries were evaluated when `lgff evaluate` sampled them (metrics.json ``sample``)."""
    sample = data.get("sample") or {}
    if not sample.get("sampled"):
        return ""
    return (f" (a seeded sample of the {sample['n_queries_total']} queries, stratified by "
            f"{sample.get('stratified_by', 'label')}, seed {sample.get('seed')}, k {sample.get('k') or 'all'})")


def _revisited_table(runs: list[Run]) -> tuple[list[str], list[list[str]]]:
    header = ["setup"] + [f"{r.name} mAP" for r in runs] + [f"{r.name} mP@10" for r in runs]
    rows = []
    for setup in ("easy", "medium", "hard"):
        rows.append([setup.capitalize()] + [_pct(r.data["metrics"].get(setup, {}).get("map")) for r in runs]
                    + [_pct(r.data["metrics"].get(setup, {}).get("mp@10")) for r in runs])
    return header, rows


def _md_table(header, rows) -> str:
    out = ["| " + " | ".join(md_text(h) for h in header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    out += ["| " + " | ".join(md_text(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def _html_table(header, rows) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_CSS = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
        "td:first-child,th:first-child{text-align:left}th{background:#f3f3f3}img{max-width:100%}"
        ".meta{color:#666;font-size:90%}")


def write_report(metrics_uris: Sequence[str], out_uri: str, *, title: str = "LGFF retrieval report",
                 n_query_examples: int = 6, max_points: int = 5000, seed: int = 0,
                 links: Sequence[tuple[str, str]] = ()) -> dict:
    """Write report.html (self-contained) + report.md + figures; returns the written URIs."""
    if not metrics_uris:
        raise DataError("no metrics files given")
    links = [(text, link_target(uri, f"link {text!r}")) for text, uri in links]  # checked before anything is written
    runs = []
    for i, uri in enumerate(metrics_uris):
        data = load_metrics(uri)
        runs.append(Run(uri=str(uri), data=data, name=_run_name(data, i),
                        is_baseline=bool(data.get("is_baseline", str(data.get("model", "")).startswith("baseline")))))
    baselines = [r for r in runs if r.is_baseline]
    baseline = baselines[0] if baselines else None
    if len(baselines) > 1:
        logger.warning("%d runs are marked as baseline; deltas use %s", len(baselines), baseline.name)
    runs = [r for r in runs if r is not baseline] + ([baseline] if baseline else [])  # baseline last

    if str(out_uri).endswith(".html"):
        html_uri = str(out_uri)
        stem = html_uri[: -len(".html")]
        md_uri, fig_dir = stem + ".md", stem + "_figures"
    else:
        html_uri, md_uri = storage.join(out_uri, "report.html"), storage.join(out_uri, "report.md")
        fig_dir = storage.join(out_uri, "figures")
    fig_rel = storage.basename(fig_dir)

    retrieval = [r for r in runs if r.data.get("kind", "retrieval") == "retrieval"]
    revisited = [r for r in runs if r.data.get("kind") == "revisited"]
    figures: list[tuple[str, str, bytes]] = []  # (file name, caption, png)
    per_class_md: list[str] = []
    per_class_html: list[str] = []
    if retrieval:
        chart = _per_class_chart(retrieval)
        if chart:
            figures.append((PER_CLASS_FIGURE, "Per-class top-1 accuracy", chart))
    for i, r in enumerate(retrieval):
        proj = _projection_figure(r, max_points, seed)
        if proj:
            figures.append((f"projection_{i}.png", f"Embedding projection: {r.name}", proj))
        grid = _query_grid(r, n_query_examples)
        if grid:
            figures.append((f"queries_{i}.png", f"Example queries: {r.name}", grid))

    md = [f"# {md_text(title)}", ""]
    body = [f"<h1>{html.escape(title)}</h1>"]
    if baseline is not None:
        line = f"Baseline: **{md_text(baseline.name)}** (frozen backbone + GeM on its last level, no neck)."
        md += [line, ""]
        body.append(f"<p>Baseline: <b>{html.escape(baseline.name)}</b> (frozen backbone + GeM on its last level, "
                    "no neck).</p>")
    else:
        md += ["No baseline run given (a metrics file with `\"is_baseline\": true`).", ""]
        body.append("<p>No baseline run given.</p>")
    if retrieval:
        header, rows = _frame_rows(_retrieval_table(retrieval, baseline if baseline in retrieval else None))
        md += ["## Retrieval", "", _md_table(header, rows), ""]
        body += ["<h2>Retrieval</h2>", _html_table(header, rows)]
        notes = "; ".join(f"{r.name}: " + (r.data.get("protocol_caption") or
                                           f"protocol {r.data.get('protocol')}, {r.data.get('n_queries')} queries, "
                                           f"database {r.data.get('database_size')}")
                          + (", full ranking" if r.data.get("full_ranking") else "") + _sample_note(r.data)
                          for r in retrieval)
        md += [f"_{md_text(notes)}_", ""]
        body.append(f"<p class='meta'>{html.escape(notes)}</p>")
        md += ["Definitions:", ""] + [f"- **{name}**: {text}" for name, text in METRIC_DEFINITIONS] + [""]
        body.append("<p class='meta'>Definitions:</p><ul class='meta'>" + "".join(
            f"<li><b>{html.escape(name)}</b>: {html.escape(text)}</li>" for name, text in METRIC_DEFINITIONS)
            + "</ul>")
        per_class = _per_class_table(retrieval)
        if per_class is not None:
            header, rows = _frame_rows(per_class)
            per_class_md = ["## Per-class top-1 accuracy", "", _md_table(header, rows), ""]
            per_class_html = ["<h2>Per-class top-1 accuracy</h2>", _html_table(header, rows)]
    if revisited:
        header, rows = _revisited_table(revisited)
        md += ["## Revisited Oxford / Paris", "", _md_table(header, rows), ""]
        body += ["<h2>Revisited Oxford / Paris</h2>", _html_table(header, rows)]
    for name, caption, png in figures:
        storage.write_bytes(storage.join(fig_dir, name), png)
        b64 = base64.b64encode(png).decode("ascii")
        img_md = f"![{md_text(caption)}]({quote(fig_rel)}/{name})"
        img_html = f"<img alt='{html.escape(caption)}' src='data:image/png;base64,{b64}'>"
        if name == PER_CLASS_FIGURE and per_class_md:
            # the per-class table beside its chart
            md += per_class_md + [img_md, ""]
            body += per_class_html[:1] + ["<div style='display:flex;gap:1em;align-items:flex-start'>",
                                          per_class_html[1], f"<div>{img_html}</div>", "</div>"]
            per_class_md = per_class_html = []
            continue
        md += [f"## {md_text(caption)}", "", img_md, ""]
        body += [f"<h2>{html.escape(caption)}</h2>", img_html]
    md += per_class_md
    body += per_class_html
    if links:  # related pages (the explain stage's explanations); only linked when present
        md += ["## Related pages", ""] + [f"- [{md_text(t)}](<{u}>)" for t, u in links] + [""]
        body += ["<h2>Related pages</h2><ul>"] + [f"<li><a href='{html.escape(u)}'>{html.escape(t)}</a></li>"
                                                   for t, u in links] + ["</ul>"]
    sources = ", ".join(r.uri for r in runs)
    md += [f"_Sources: {md_text(sources)}_", ""]
    body.append(f"<p class='meta'>Sources: {html.escape(sources)}</p>")
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body>{''.join(body)}</body></html>")
    storage.write_text(md_uri, "\n".join(md))
    storage.write_text(html_uri, page)  # last: its presence means the report is complete
    logger.info("report with %d run(s) and %d figure(s) -> %s", len(runs), len(figures), html_uri)
    return {"html": html_uri, "markdown": md_uri, "figures": [storage.join(fig_dir, f) for f, _, _ in figures],
            "baseline": baseline.name if baseline else None}
