"""`lgff data info URI` (counts per split / label, size, schema) and `lgff data verify URI` (sha256, sizes, row
counts and schema of every shard against the manifest; exit 2 on any mismatch)."""
from __future__ import annotations

import argparse
import json

from ..errors import DataError


def register(subparsers) -> None:
    data = subparsers.add_parser("data", help="inspect and verify Parquet shard datasets")
    sub = data.add_subparsers(dest="data_command", metavar="ACTION")
    sub.required = True
    p = sub.add_parser("info", help="counts per split and label, size, schema")
    p.add_argument("uri")
    p.add_argument("--json", action="store_true", help="print the manifest summary as JSON")
    p.set_defaults(func=_info)
    p = sub.add_parser("verify", help="check shard sha256 / size / rows / schema against the manifest")
    p.add_argument("uri")
    p.set_defaults(func=_verify)


def _info(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from ..data.shards import read_manifest, read_table

    m = read_manifest(args.uri)
    if args.json:
        print(json.dumps({"uri": m.uri, "kind": m.kind, "converter": m.converter, "num_rows": m.num_rows,
                          "num_shards": m.num_shards, "bytes": m.total_bytes, "split_counts": m.split_counts,
                          "label_counts": m.label_counts, "label_names": m.label_names,
                          "skipped": len(m.skipped)}, indent=1, sort_keys=True))
        return 0
    console = Console()
    console.print(f"[bold]{m.uri}[/bold]  kind={m.kind}  converter={m.converter}  rows={m.num_rows}  "
                  f"shards={m.num_shards}  size={m.total_bytes / 2**20:.2f} MB  "
                  f"fingerprint={m.source_fingerprint[:12]}  skipped={len(m.skipped)}")
    # counts per (label, split) from the small columns only (streamed per shard)
    counts: dict[tuple[str, str], int] = {}
    splits = sorted(m.split_counts)
    for i in range(m.num_shards):
        t = read_table(m.uri, columns=["label_name", "split"], shards=[i], manifest=m)
        for name, split in zip(t.column("label_name").to_pylist(), t.column("split").to_pylist()):
            counts[(name, split)] = counts.get((name, split), 0) + 1
    table = Table(title="rows per label and split")
    table.add_column("label", justify="right")
    table.add_column("name")
    for s in splits:
        table.add_column(s, justify="right")
    table.add_column("total", justify="right")
    names = list(m.label_names) or sorted({n for n, _ in counts})
    extra = sorted({n for n, _ in counts} - set(names))
    for idx, name in enumerate(names + extra):
        row = [counts.get((name, s), 0) for s in splits]
        label = str(idx) if idx < len(m.label_names) else "-1"
        table.add_row(label, name or "(none)", *map(str, row), str(sum(row)))
    table.add_row("", "[bold]all[/bold]", *(str(m.split_counts[s]) for s in splits), str(m.num_rows))
    console.print(table)
    if m.kind == "coco":
        per_cat: dict[int, int] = {}
        for i in range(m.num_shards):
            t = read_table(m.uri, columns=["annotations"], shards=[i], manifest=m)
            for anns in t.column("annotations").to_pylist():
                for a in anns or []:
                    per_cat[a["category_id"]] = per_cat.get(a["category_id"], 0) + 1
        cats = Table(title="annotations per category")
        cats.add_column("id", justify="right")
        cats.add_column("name")
        cats.add_column("annotations", justify="right")
        names = {c["id"]: c["name"] for c in m.extra.get("categories", [])}
        for cid in sorted(set(names) | set(per_cat)):
            cats.add_row(str(cid), names.get(cid, "?"), str(per_cat.get(cid, 0)))
        cats.add_row("", "[bold]all[/bold]", str(sum(per_cat.values())))
        console.print(cats)
    schema = Table(title="schema")
    schema.add_column("column")
    schema.add_column("type")
    for name, typ in m.schema:
        schema.add_row(name, typ)
    console.print(schema)
    if m.skipped:
        console.print(f"[yellow]{len(m.skipped)} skipped input(s)[/yellow], first: {m.skipped[0]}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from ..data.shards import read_manifest, verify_dataset

    m = read_manifest(args.uri)
    problems = verify_dataset(args.uri)
    if problems:
        raise DataError(f"{args.uri}: {len(problems)} problem(s): " + "; ".join(problems))
    print(f"{m.uri}: OK ({m.num_shards} shard(s), {m.num_rows} rows, sha256 and schema match the manifest)")
    return 0
