"""Search an index with new images: embed queries exactly as the embed stage does, look up the hits' images.

``Searcher`` = an `Embedder` (`lgff_core.retrieval.embed`: same checkpoint loading, transform, channels-last / bf16 settings
and L2 normalisation as `lgff embed`) + a loaded index (`lgff_core.index`). A query image goes through
`decode_image` -> `eval_transform(data_config, image_size)` -> `embed_images`, the embed stage's own functions,
so an image that is in the index finds itself first with cosine 1.0 (fp32).

Hit record (results.json, the search service): ``{"sample_id", "label", "label_name", "group", "score"}``, score =
cosine for ``metric: ip`` indexes, L2 distance for ``metric: l2``; order = the index's (score, then database position).

Image lookup: ``locations.parquet`` beside the index holds, for every database position (index order), the
``sample_id`` and its ``(shard, row)`` in the dataset the index was built from. It is built by streaming only the
dataset's ``sample_id`` column (pyarrow, one shard at a time; the images are never read), keyed by the dataset
manifest's shard digests, and written once (atomically) the first time it is needed; a stale or missing file is
rebuilt. Reading a hit's image then opens one row group of one shard.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from .. import storage
from ..config import LGFFConfig
from ..errors import DataError, IndexError_, LGFFError, StorageError

logger = logging.getLogger(__name__)

__all__ = [
    "LOCATIONS_FILE",
    "IMAGE_SUFFIXES",
    "QueryImage",
    "ImageLocator",
    "Searcher",
    "dataset_locations",
    "index_locations",
    "read_query_files",
    "read_query_ids",
    "query_transform",
    "embed_query_images",
    "search_to_dir",
]

LOCATIONS_FILE = "locations.parquet"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")


@dataclasses.dataclass
class QueryImage:
    """One query: encoded image bytes plus where it came from (a file path or a dataset sample_id)."""

    name: str
    data: bytes
    sample_id: Optional[str] = None
    label: Optional[int] = None
    label_name: Optional[str] = None


# ------------------------------------------------------------------------------------------------ index coupling


def index_sources(bundle) -> tuple[str, Optional[str]]:
    """(dataset URI, embeddings URI) an index was built from.

    The one place that reads index metadata beyond the public `load_index` / id map: the index layout may change
    (versioned manifests), this function follows it.
    """
    meta = bundle.meta
    dataset = meta.get("source")
    embeddings = meta.get("embeddings")
    if not dataset and embeddings:
        from ..data.embeddings import read_embeddings_manifest

        dataset = read_embeddings_manifest(embeddings).get("source")
    if not dataset:
        raise IndexError_(f"{meta.get('uri', 'index')}: records no source dataset; cannot read hit images")
    return str(dataset), (str(embeddings) if embeddings else None)


def _locations_uri(index_uri: str) -> str:
    return storage.join(index_uri, LOCATIONS_FILE)


# ------------------------------------------------------------------------------------------------ locations


def _dataset_digest(manifest) -> str:
    h = hashlib.sha256()
    for s in manifest.shards:
        h.update(f"{s.name}:{s.sha256}:{s.num_rows}\n".encode())
    return h.hexdigest()


def dataset_locations(dataset_uri: str, manifest=None) -> pa.Table:
    """``sample_id, shard, row`` of every row of a dataset, streaming only its sample_id column."""
    from ..data.shards import iter_record_batches, read_manifest

    manifest = manifest or read_manifest(dataset_uri)
    parts = []
    for si, info in enumerate(manifest.shards):
        ids = [b.column(0) for b in iter_record_batches(dataset_uri, columns=["sample_id"], shards=[si],
                                                        batch_size=65536, manifest=manifest)]
        col = pa.chunked_array(ids, pa.string()) if ids else pa.chunked_array([], pa.string())
        if len(col) != info.num_rows:
            raise DataError(f"{manifest.shard_uri(si)}: {len(col)} rows, the manifest says {info.num_rows}")
        parts.append(pa.table({"sample_id": col, "shard": pa.array(np.full(len(col), si, np.int32)),
                               "row": pa.array(np.arange(len(col), dtype=np.int64))}))
    if not parts:
        return pa.table({"sample_id": pa.array([], pa.string()), "shard": pa.array([], pa.int32()),
                         "row": pa.array([], pa.int64())})
    return pa.concat_tables(parts)


def _locations_in_index_order(idmap_ids: pa.Array, dataset_uri: str, manifest) -> pa.Table:
    locs = dataset_locations(dataset_uri, manifest)
    order = pa.table({"sample_id": idmap_ids, "position": pa.array(np.arange(len(idmap_ids), dtype=np.int64))})
    joined = order.join(locs, "sample_id", join_type="left outer").sort_by("position")
    missing = joined.filter(pc.is_null(joined.column("shard")))
    if missing.num_rows:
        raise DataError(f"{dataset_uri}: {missing.num_rows} indexed sample_id(s) are not in the dataset, "
                        f"e.g. {missing.column('sample_id')[0].as_py()!r}")
    if joined.num_rows != len(idmap_ids):
        raise DataError(f"{dataset_uri}: sample_ids are not unique (join gave {joined.num_rows} rows "
                        f"for {len(idmap_ids)} indexed ids)")
    return joined.select(["sample_id", "shard", "row"])


def index_locations(index_uri: str, bundle, write: bool = True) -> pa.Table:
    """The (shard, row) of every database position of the index; read from beside the index or built (and stored).

    A stored table whose dataset digest differs from the dataset's manifest (the dataset was rebuilt) is rebuilt.
    Storing is best effort: a read-only index location only logs a warning.
    """
    from ..data.shards import read_manifest

    dataset_uri, _ = index_sources(bundle)
    manifest = read_manifest(dataset_uri)
    digest = _dataset_digest(manifest)
    uri = _locations_uri(index_uri)
    if storage.exists(uri):
        with storage.open_input_file(uri) as f:
            table = pq.read_table(f)
        meta = json.loads((table.schema.metadata or {}).get(b"lgff", b"{}"))
        if meta.get("dataset_digest") == digest and table.num_rows == bundle.rows.num_rows:
            return table
        logger.info("%s is stale (dataset or index changed); rebuilding", uri)
    table = _locations_in_index_order(bundle.idmap.column("sample_id").combine_chunks(), dataset_uri, manifest)
    table = table.replace_schema_metadata({"lgff": json.dumps({"dataset": dataset_uri, "dataset_digest": digest})})
    if write:
        try:
            with storage.atomic_output(uri) as f:
                pq.write_table(table, f)
            logger.info("wrote %s (%d rows)", uri, table.num_rows)
        except StorageError as exc:
            logger.warning("cannot store %s (%s); using it in memory", uri, exc)
    return table


class ImageLocator:
    """Reads images of a dataset by (shard, row), one row group at a time, from shards verified against the
    dataset manifest (`lgff_core.data.shards.open_shard`: streamed sha256, once per shard and process)."""

    def __init__(self, dataset_uri: str, manifest=None):
        from ..data.shards import read_manifest

        self.dataset_uri = dataset_uri
        self.manifest = manifest or read_manifest(dataset_uri)
        self._offsets = {}
        for si, info in enumerate(self.manifest.shards):
            self._offsets[si] = np.cumsum([0] + list(info.row_groups)) if info.row_groups else None

    def read(self, locations: Iterable[tuple[int, int]]) -> dict[tuple[int, int], bytes]:
        """Encoded image bytes for each (shard, row)."""
        from ..data.shards import open_shard

        wanted: dict[int, set[int]] = {}
        for shard, row in locations:
            wanted.setdefault(int(shard), set()).add(int(row))
        out = {}
        for shard, rows in sorted(wanted.items()):
            if not 0 <= shard < self.manifest.num_shards:
                raise DataError(f"{self.dataset_uri}: no shard {shard} (the dataset has {self.manifest.num_shards}); "
                                "the index's locations are stale")
            # checked against the manifest's sha256 (once per process): a rewritten shard would show other images
            pf = open_shard(self.manifest, shard)
            offsets = self._offsets.get(shard)
            if offsets is None:
                offsets = np.cumsum([0] + [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)])
            by_group: dict[int, list[int]] = {}
            for row in rows:
                g = int(np.searchsorted(offsets, row, side="right") - 1)
                if not 0 <= g < len(offsets) - 1:
                    raise DataError(f"{self.manifest.shard_uri(shard)}: no row {row}")
                by_group.setdefault(g, []).append(row)
            for g, group_rows in by_group.items():
                images = pf.read_row_group(g, columns=["image"]).column(0)
                for row in group_rows:
                    out[(shard, row)] = images[row - int(offsets[g])].as_py()
        return out


# ------------------------------------------------------------------------------------------------ queries


def _list_images(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"{path}: directory holds no image files ({', '.join(IMAGE_SUFFIXES)})")
        return files
    if not path.is_file():
        raise DataError(f"{path}: no such file or directory")
    return [path]


def read_query_files(paths: Sequence[str]) -> list[QueryImage]:
    """Query images from files and directories (searched recursively for image suffixes), checked decodable."""
    from ..data.images import decode_image

    out = []
    for p in paths:
        for f in _list_images(Path(p)):
            data = f.read_bytes()
            try:
                decode_image(data)
            except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad bytes
                raise DataError(f"{f}: not a readable image ({type(exc).__name__}: {exc})") from None
            out.append(QueryImage(name=str(f), data=data))
    return out


def read_query_ids(dataset_uri: str, ids: Sequence[str]) -> list[QueryImage]:
    """Query images by sample_id from a dataset (any dataset, not only the indexed one)."""
    from ..data.shards import read_manifest, read_table

    manifest = read_manifest(dataset_uri)
    locs = dataset_locations(dataset_uri, manifest)
    found = locs.filter(pc.is_in(locs.column("sample_id"), value_set=pa.array(list(ids), pa.string())))
    where = {sid: (s, r) for sid, s, r in zip(*(found.column(c).to_pylist() for c in ("sample_id", "shard", "row")))}
    unknown = [i for i in ids if i not in where]
    if unknown:
        raise DataError(f"{dataset_uri}: no sample_id {unknown[0]!r}" + (f" (and {len(unknown) - 1} more)"
                                                                            if len(unknown) > 1 else ""))
    images = ImageLocator(dataset_uri, manifest).read(where.values())
    out = []
    for sid in ids:
        shard, row = where[sid]
        meta = read_table(dataset_uri, columns=["label", "label_name"], shards=[shard], manifest=manifest).slice(row, 1)
        out.append(QueryImage(name=sid, data=images[(shard, row)], sample_id=sid,
                              label=int(meta.column("label")[0].as_py()),
                              label_name=meta.column("label_name")[0].as_py()))
    return out


def query_transform(embedder):
    """Encoded image bytes -> the (3, S, S) model input `lgff embed` makes of them (decode, then eval transform).

    Limits: the decoder's default pixel limit; a caller with tighter ones checks the header first (the service)."""
    from ..data.images import decode_image
    from ..data.transforms import eval_transform

    transform = eval_transform(embedder.data_config, embedder.image_size)
    return lambda data: transform(decode_image(data))


def embed_query_images(embedder, images: Sequence[bytes], batch_size: int = 64) -> np.ndarray:
    """(n, D) float32 L2-normalised descriptors of encoded images, computed as `lgff embed` computes them."""
    from .embed import embed_images

    to_input = query_transform(embedder)
    out = np.zeros((len(images), embedder.dim), np.float32)
    for start in range(0, len(images), batch_size):
        batch = torch.stack([to_input(b) for b in images[start:start + batch_size]])
        out[start:start + len(batch)] = embed_images(embedder, batch)
    return out


# ------------------------------------------------------------------------------------------------ searcher


class Searcher:
    """A model (or baseline) + an index, ready to answer image queries (used by the CLI, explain and the service)."""

    def __init__(self, model_uri: Optional[str], index_uri: str, cfg: LGFFConfig, baseline: Optional[str] = None,
                 weights: Optional[str] = None):
        from .embed import load_embedder
        from ..index import load_index

        self.cfg = cfg
        self.index_uri = str(index_uri)
        bundle = load_index(index_uri)
        self.embedder = load_embedder(model_uri, cfg, baseline, weights=weights)
        self._attach(bundle)

    def _attach(self, bundle) -> None:
        if self.embedder.dim != bundle.index.d:
            raise IndexError_(f"{self.index_uri}: index dimension {bundle.index.d}, the model embeds "
                              f"{self.embedder.dim}-d descriptors (wrong model for this index?)")
        self.bundle = bundle
        self._check_fingerprint()
        # set once: searches may run concurrently (the service), and these do not change per query
        from ..index import set_search_params

        set_search_params(self.bundle.index, self.cfg.index.nprobe, self.cfg.index.ef_search)
        self.label_names = list(self.bundle.meta.get("label_names") or [])
        self._locations: Optional[pa.Table] = None
        self._locator: Optional[ImageLocator] = None

    def with_index(self, bundle) -> "Searcher":
        """The same model over another loaded version of the index (the service picks up a rebuilt index)."""
        other = copy.copy(self)
        other._attach(bundle)
        return other

    def _check_fingerprint(self) -> None:
        _, emb_uri = index_sources(self.bundle)
        if not emb_uri:
            return
        try:
            from ..data.embeddings import read_embeddings_manifest

            indexed = read_embeddings_manifest(emb_uri).get("model_fingerprint")
        except LGFFError:
            return
        if indexed and indexed != self.embedder.fingerprint:
            logger.warning("query embedding settings (model, image size, precision) differ from the ones the index "
                           "was embedded with (%s); scores may not be comparable", emb_uri)

    @property
    def metric(self) -> str:
        return self.bundle.metric

    def embed(self, images: Sequence[bytes]) -> np.ndarray:
        return embed_query_images(self.embedder, images, self.cfg.embed.batch_size)

    def search_vectors(self, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        from ..index import prepare_vectors, search
        from ..index.core import check_not_empty

        index = self.bundle.index
        check_not_empty(index, self.index_uri)
        if k > index.ntotal:
            raise IndexError_(f"k={k} is larger than the index ({index.ntotal} vectors)")
        return search(index, prepare_vectors(xq, self.metric, index.d, where="queries"), k)

    def hits(self, D: np.ndarray, I: np.ndarray) -> list[list[dict]]:
        # the id map's strings are read for the hit positions only (one pass over its row groups per call)
        safe = np.maximum(I, 0)
        ids, groups = self.bundle.rows.take("sample_id", safe), self.bundle.rows.take("group", safe)
        out = []
        for q, (drow, irow) in enumerate(zip(D, I)):
            row = []
            for j, (score, pos) in enumerate(zip(drow, irow)):
                if pos < 0:
                    continue
                label = int(self.bundle.labels[pos])
                row.append({"sample_id": str(ids[q, j]), "label": label,
                            "label_name": self.label_names[label] if 0 <= label < len(self.label_names) else str(label),
                            "group": str(groups[q, j]), "score": float(score), "position": int(pos)})
            out.append(row)
        return out

    def search(self, images: Sequence[bytes], k: int) -> list[list[dict]]:
        """Hit records of each encoded query image."""
        D, I = self.search_vectors(self.embed(images), k)
        return self.hits(D, I)

    def hit_images(self, positions: Iterable[int]) -> dict[int, bytes]:
        """Encoded images of database positions, read from the indexed dataset."""
        if self._locations is None:
            self._locations = index_locations(self.index_uri, self.bundle)
            self._locator = ImageLocator(index_sources(self.bundle)[0])
        shard = self._locations.column("shard")
        row = self._locations.column("row")
        pos = sorted(set(int(p) for p in positions))
        where = {p: (shard[p].as_py(), row[p].as_py()) for p in pos}
        images = self._locator.read(where.values())
        return {p: images[where[p]] for p in pos}


def public_hit(hit: dict) -> dict:
    """The published hit record (database position is internal)."""
    return {k: hit[k] for k in ("sample_id", "label", "label_name", "group", "score")}


# ------------------------------------------------------------------------------------------------ outputs

_CSS = ("body{font-family:sans-serif;margin:1.5em;color:#222}.q{display:flex;gap:10px;margin:0 0 18px 0;"
        "align-items:flex-start;border-bottom:1px solid #ddd;padding-bottom:12px}.c{width:132px;font-size:12px;"
        "text-align:center;word-break:break-all}.c img{width:128px;height:128px;object-fit:contain;"
        "image-rendering:pixelated;border:2px solid #999;background:#eee}.c.query img{border-color:#000}"
        ".c.same img{border-color:#2a2}.c.other img{border-color:#c33}.meta{color:#666;font-size:90%}")


def _thumb(data: bytes, size: int = 128) -> str:
    import base64
    import io

    from PIL import Image, ImageOps

    from ..data.images import decode_image

    im = ImageOps.contain(decode_image(data), (size, size), method=Image.Resampling.NEAREST)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def results_html(queries: Sequence[QueryImage], hits: Sequence[Sequence[dict]], images: dict[int, bytes],
                 title: str, note: str) -> str:
    """A self-contained page: each query beside its hits (thumbnail, class, score)."""
    import html

    esc = html.escape
    body = [f"<h1>{esc(title)}</h1><p class='meta'>{esc(note)}</p>"]
    for q, row in zip(queries, hits):
        qlabel = f"<br>{esc(q.label_name)}" if q.label_name else ""
        cells = [f"<div class='c query'><img alt='query' src='{_thumb(q.data)}'><br><b>query</b>"
                 f"<br>{esc(os.path.basename(q.name))}{qlabel}</div>"]
        for rank, h in enumerate(row, 1):
            cls = "" if q.label is None else ("same" if h["label"] == q.label else "other")
            img = f"<img alt='{esc(h['sample_id'])}' src='{_thumb(images[h['position']])}'>" \
                if h["position"] in images else "<div>(no image)</div>"
            cells.append(f"<div class='c {cls}'>{img}<br>#{rank} <b>{esc(h['label_name'])}</b>"
                         f"<br>score {h['score']:.4f}<br>{esc(h['sample_id'])}</div>")
        body.append(f"<div class='q'>{''.join(cells)}</div>")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{esc(title)}</title><style>{_CSS}</style>"
            f"</head><body>{''.join(body)}</body></html>")


def search_to_dir(searcher: Searcher, queries: Sequence[QueryImage], k: int, out_uri: str) -> dict:
    """Search, then write ``results.html`` and ``results.json`` (last) under `out_uri`; returns the JSON document."""
    if not queries:
        raise DataError("no query images")
    hits = searcher.search([q.data for q in queries], k)
    images = searcher.hit_images(h["position"] for row in hits for h in row)
    dataset_uri, _ = index_sources(searcher.bundle)
    doc = {
        "index": searcher.index_uri, "model": searcher.embedder.name, "metric": searcher.metric, "k": int(k),
        "dataset": dataset_uri, "image_size": searcher.embedder.image_size,
        "queries": [{"query": {"name": q.name, "sample_id": q.sample_id, "label": q.label,
                               "label_name": q.label_name},
                     "hits": [public_hit(h) for h in row]} for q, row in zip(queries, hits)],
    }
    score = "cosine" if searcher.metric == "ip" else "L2 distance"
    page = results_html(queries, hits, images, "LGFF search",
                        f"model {searcher.embedder.name}; index {searcher.index_uri} "
                        f"({searcher.bundle.index.ntotal} images); score = {score}; "
                        "green / red frame = same / other class as the query (when the query's class is known)")
    storage.write_text(storage.join(out_uri, "results.html"), page)
    storage.write_text(storage.join(out_uri, "results.json"), json.dumps(doc, indent=1))  # last
    return doc
