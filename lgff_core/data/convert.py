"""Shared machinery of every converter (`lgff prep ...`): inputs -> sorted tasks -> rows -> shards -> manifest.

A converter lists its inputs as `Task`s (cheap metadata only: a sample id, a module-level loader function and its
picklable arguments), computes a source fingerprint, and calls `write_dataset`. `write_dataset`:

0. takes the writer lease of the output prefix (`storage.lease`): a second writer into the same prefix waits or
   fails naming the holder, and never deletes the first one's parts; the lease is checked again before publishing;
1. checks the output prefix: a manifest with the same fingerprint -> nothing to do; a different fingerprint ->
   `DataError` (never overwrite another dataset); part files without a manifest (a killed run) -> deleted;
2. sorts a task list by sample id (a task iterator must already be in that order: file-tree converters stream
   their tasks so memory stays flat in the number of images) and rejects duplicates, naming both sources;
3. runs the loaders in order (optionally in a process pool, results kept in task order), writing rows through
   `ShardWriter`; a loader error either fails the run (``on_error="fail"``, nothing published) or is recorded in
   the manifest's ``skipped`` list (``on_error="skip"``);
4. writes ``_manifest.json`` last.

Output is byte-deterministic for the same inputs and parameters (the worker count does not change it).
"""
from __future__ import annotations

import hashlib
import itertools
import json
import logging
import multiprocessing
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Optional

import pyarrow as pa

from .. import storage
from ..errors import DataError, LGFFError
from .shards import (
    IMAGE_SCHEMA,
    MANIFEST_NAME,
    SCHEMA_VERSION,
    Manifest,
    ShardWriter,
    list_stale_parts,
    read_manifest,
    write_manifest,
)

# bump when converter output bytes change for the same inputs (a rerun must not mistake old output for new)
PREP_VERSION = 1

__all__ = ["Task", "ConvertOptions", "write_dataset", "fingerprint", "prepare_output", "RowError"]

log = logging.getLogger(__name__)


class RowError(Exception):
    """Raised by a loader: this input cannot be converted (message says why; the task names the input)."""


@dataclass(frozen=True, slots=True)  # slots: one Task per input image is the only per-image state kept in memory
class Task:
    sample_id: str
    source: str  # human-readable input name used in errors and the skipped list
    # module-level function -> a row dict, or a list of rows each carrying a sample_id that starts with the
    # task's sample_id + "/" (so sorting tasks sorts rows), or None (nothing to write)
    loader: Callable[..., Any]
    args: tuple = ()


@dataclass
class ConvertOptions:
    shard_mb: float = 128.0
    workers: int = 1
    seed: int = 0
    on_error: str = "fail"  # "fail" | "skip"
    row_group_mb: float = 4.0
    # images declaring more pixels (from the header) are refused (data.max_pixels)
    max_pixels: int = 50_000_000
    progress: Optional[Callable[[Iterable], Iterable]] = None  # e.g. tqdm, supplied by the CLI

    def __post_init__(self) -> None:
        if self.on_error not in ("fail", "skip"):
            raise DataError(f"on_error must be 'fail' or 'skip', got {self.on_error!r}")
        if self.shard_mb <= 0:
            raise DataError(f"--shard-mb must be > 0, got {self.shard_mb}")
        if self.workers < 1:
            raise DataError(f"--workers must be >= 1, got {self.workers}")


def fingerprint(converter: str, params: dict, inputs: Iterable[Any]) -> str:
    """sha256 over the converter, its output-relevant parameters and a canonical description of the inputs."""
    h = hashlib.sha256()
    h.update(json.dumps({"converter": converter, "params": params, "prep_version": PREP_VERSION,
                         "schema_version": SCHEMA_VERSION}, sort_keys=True).encode())
    for item in inputs:
        h.update(json.dumps(item, sort_keys=True, default=str).encode())
        h.update(b"\n")
    return h.hexdigest()


def prepare_output(out_uri: str, source_fingerprint: str) -> Optional[Manifest]:
    """Make `out_uri` ready for writing. Returns the existing manifest when it already holds this dataset."""
    murl = storage.join(out_uri, MANIFEST_NAME)
    if storage.exists(murl):
        try:
            existing = read_manifest(out_uri)
        except DataError as exc:
            raise DataError(f"{out_uri}: already holds a dataset with an unreadable manifest ({exc}); "
                            "delete it or choose another --out") from None
        if existing.source_fingerprint == source_fingerprint:
            return existing
        raise DataError(
            f"{out_uri}: already holds a different dataset (converter {existing.converter!r}, fingerprint "
            f"{existing.source_fingerprint[:12]} != {source_fingerprint[:12]}); delete it or choose another --out")
    stale = list_stale_parts(out_uri)
    if stale:
        log.warning("%s: %d part file(s) without a manifest (interrupted run): deleting them", out_uri, len(stale))
        for f in stale:
            storage.delete(f)
    return None


def _run_task(task: Task) -> tuple[str, Any]:
    try:
        return "ok", task.loader(*task.args)
    except (RowError, LGFFError) as exc:
        return "error", str(exc)
    except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
        return "error", f"{type(exc).__name__}: {exc}"


def _results(tasks: Iterable[Task], workers: int, window: int = 4096) -> Iterator[tuple[Task, tuple[str, Any]]]:
    """``(task, result)`` in task order. Tasks are consumed lazily (a window at a time with a process pool), so
    a task generator is never materialised."""
    if workers <= 1:
        for t in tasks:
            yield t, _run_task(t)
        return
    # spawn: never fork a process that may hold torch / OpenMP threads
    ctx = multiprocessing.get_context("spawn")
    it = iter(tasks)
    with ctx.Pool(workers) as pool:
        while True:
            chunk = list(itertools.islice(it, window))
            if not chunk:
                break
            size = max(1, min(64, len(chunk) // (workers * 8)))
            yield from zip(chunk, pool.imap(_run_task, chunk, chunksize=size))


def write_dataset(
    out_uri: str,
    tasks: Iterable[Task],
    *,
    converter: str,
    params: dict,
    source_fingerprint: str,
    label_names: list[str],
    options: ConvertOptions,
    schema: pa.Schema = IMAGE_SCHEMA,
    kind: str = "images",
    skipped: Optional[list[dict]] = None,
    extra: Optional[dict] = None,
    total: Optional[int] = None,
) -> Manifest:
    """Convert `tasks` into a dataset at `out_uri` (see the module docstring). Returns its manifest.

    `tasks` is a list (sorted here) or an iterator already in sample_id order (checked as it is consumed; this is
    how file-tree converters keep memory flat in the number of images). `total` sizes the progress bar.
    """
    out_uri = str(out_uri).rstrip("/")
    with storage.lease(out_uri, owner=f"lgff prep {converter}") as held:
        return _write_dataset_leased(out_uri, tasks, held, converter=converter, params=params,
                                     source_fingerprint=source_fingerprint, label_names=label_names,
                                     options=options, schema=schema, kind=kind, skipped=skipped, extra=extra,
                                     total=total)


def _write_dataset_leased(out_uri, tasks, held, *, converter, params, source_fingerprint, label_names, options,
                          schema, kind, skipped, extra, total) -> Manifest:
    existing = prepare_output(out_uri, source_fingerprint)
    if existing is not None:
        log.info("%s: already holds this dataset (fingerprint %s): nothing to do", out_uri, source_fingerprint[:12])
        return existing
    skipped = list(skipped or [])
    if options.on_error == "fail" and skipped:
        raise DataError(skipped[0]["reason"] if "reason" in skipped[0] else str(skipped[0]))

    if isinstance(tasks, list):
        tasks = sorted(tasks, key=lambda t: t.sample_id)
        total = len(tasks) if total is None else total
        for a, b in zip(tasks, tasks[1:]):
            if a.sample_id == b.sample_id:
                raise DataError(f"duplicate sample_id {a.sample_id!r}: {a.source} and {b.source}")

    writer = ShardWriter(out_uri, schema=schema, shard_mb=options.shard_mb, row_group_mb=options.row_group_mb)
    split_counts: dict[str, int] = {}
    label_counts: dict[str, int] = {}
    last_id: Optional[str] = None
    prev: Optional[Task] = None
    results: Iterable = _results(tasks, options.workers)
    if options.progress is not None:
        results = options.progress(results, total=total)
    try:
        for task, (status, value) in results:
            if prev is not None and task.sample_id <= prev.sample_id:
                what = "duplicate" if task.sample_id == prev.sample_id else "out-of-order"
                raise DataError(f"{what} sample_id {task.sample_id!r}: {prev.source} and {task.source}")
            prev = task
            if status == "error":
                if options.on_error == "fail":
                    raise DataError(f"{task.source}: {value}")
                log.warning("skipping %s: %s", task.source, value)
                skipped.append({"input": task.source, "reason": value})
                continue
            if value is None:
                continue
            # a loader returns one row, or a list of rows whose sample_ids extend the task's ("patch/instance")
            rows = value if isinstance(value, list) else [dict(value, sample_id=task.sample_id)]
            for row in sorted(rows, key=lambda r: r["sample_id"]):
                row.setdefault("source", task.source)
                if last_id is not None and row["sample_id"] <= last_id:
                    raise DataError(f"{task.source}: sample_id {row['sample_id']!r} is a duplicate of or sorts "
                                    f"before the previous row {last_id!r}")
                last_id = row["sample_id"]
                writer.write(row)
                split_counts[row["split"]] = split_counts.get(row["split"], 0) + 1
                label_counts[row["label_name"]] = label_counts.get(row["label_name"], 0) + 1
        shards = writer.close()
    except BaseException:
        # nothing half-written stays behind: drop the open shard and the parts this run published
        writer.abort()
        for info in writer.shards:
            try:
                storage.delete(storage.join(out_uri, info.name), retry=False)
            except LGFFError as exc:  # best effort: a rerun also deletes parts without a manifest
                log.warning("could not remove %s: %s", info.name, exc)
        raise
    manifest = Manifest(
        uri=out_uri,
        kind=kind,
        shards=shards,
        label_names=list(label_names),
        split_counts=dict(sorted(split_counts.items())),
        label_counts=dict(sorted(label_counts.items())),
        source_fingerprint=source_fingerprint,
        converter=converter,
        params=params,
        skipped=skipped,
        schema=[[f.name, str(f.type)] for f in schema],
        total_bytes=sum(s.bytes for s in shards),
        extra=extra or {},
    )
    if manifest.num_rows == 0:
        raise DataError(f"{out_uri}: no rows to write (all input(s) skipped or none found)")
    held.check()
    write_manifest(manifest)
    log.info("%s: %d rows in %d shard(s), %.1f MB, %d skipped", out_uri, manifest.num_rows, len(shards),
             manifest.total_bytes / 2**20, len(skipped))
    return manifest
