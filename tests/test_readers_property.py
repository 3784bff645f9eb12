"""Property-based tests of the readers (hypothesis, bounded examples): hostile input of every kind the converters and
the shard readers accept gives the project's own error: one line on stderr, exit 2, no traceback, and nothing
written outside the output prefix."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from lgff_core.cli import main  # noqa: E402
from lgff_core.data.images import decode_image, probe_image, ImageCheckError  # noqa: E402
from lgff_core.data.shards import IMAGE_SCHEMA, read_manifest  # noqa: E402
from lgff_core.errors import DataError  # noqa: E402
from test_reliability import _dataset, _one_line, _png  # noqa: E402

BOUNDED = settings(max_examples=12, deadline=None, derandomize=True,
                   suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
EMBED = ["--set", "embed.image_size=32", "--set", "embed.bf16=false", "--set", "embed.channels_last=false"]


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _run_confined(tmp: Path, out: Path, argv: list[str], capsys) -> tuple[int, str]:
    """Run the CLI; everything it creates under `tmp` must be under `out`."""
    before = _files(tmp)
    code = main(argv)
    err = capsys.readouterr().err
    created = {f for f in _files(tmp) - before if not (tmp / f).resolve().is_relative_to(out.resolve())}
    assert not created, f"written outside {out}: {sorted(created)}"
    return code, err


# ------------------------------------------------------------------------------------------- images

PREFIXES = [b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a", b"BM", b"II*\x00", b"RIFF"]


@BOUNDED
@given(prefix=st.sampled_from(PREFIXES), body=st.binary(max_size=600), check=st.sampled_from(["fast", "decode"]))
def test_random_bytes_as_images_are_one_line_errors(tmp_path_factory, capsys, prefix, body, check):
    data = prefix + body
    for fn in (lambda: probe_image(data, check=check), lambda: decode_image(data, sample_id="x")):
        try:
            fn()
        except (ImageCheckError, DataError) as exc:
            assert "\n" not in str(exc) and " at 0x" not in str(exc)
    tmp = tmp_path_factory.mktemp("img")
    for c in ("a", "b"):
        (tmp / "src" / c).mkdir(parents=True)
        (tmp / "src" / c / "ok.png").write_bytes(_png(1))
    (tmp / "src" / "a" / "bad.png").write_bytes(data)
    out = tmp / "out"
    code, err = _run_confined(tmp, out, ["prep", "imagefolder", "--src", str(tmp / "src"), "--out", str(out),
                                         "--no-progress", "--check", check], capsys)
    if code != 0:
        assert code == 2 and "bad.png" in _one_line(err)
        assert not (out / "_manifest.json").exists()


# ------------------------------------------------------------------------------------------- COCO JSON

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | st.floats(allow_nan=False, width=32) | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=12)
image_entry = st.fixed_dictionaries({"id": json_values | st.integers(0, 3), "file_name": json_values,
                                     "width": json_values, "height": json_values})
ann_entry = st.fixed_dictionaries({"id": json_values | st.integers(0, 3), "image_id": json_values,
                                   "category_id": json_values, "bbox": json_values, "segmentation": json_values,
                                   "area": json_values, "iscrowd": json_values})
coco_docs = st.one_of(
    json_values,
    st.fixed_dictionaries({"images": st.lists(image_entry, max_size=2) | json_values,
                           "annotations": st.lists(ann_entry, max_size=2) | json_values,
                           "categories": st.lists(st.fixed_dictionaries({"id": json_values, "name": json_values}),
                                                  max_size=2) | json_values}),
)


@BOUNDED
@given(doc=coco_docs, raw=st.booleans())
def test_malformed_coco_json_is_a_one_line_error(tmp_path_factory, capsys, doc, raw):
    tmp = tmp_path_factory.mktemp("coco")
    (tmp / "images").mkdir()
    (tmp / "images" / "a.png").write_bytes(_png(2))
    ann = tmp / "instances_train.json"
    ann.write_text(json.dumps(doc)[:-1] if raw else json.dumps(doc))  # raw: truncated JSON text
    out = tmp / "out"
    code, err = _run_confined(tmp, out, ["prep", "coco", "--images", str(tmp / "images"), "--annotations", str(ann),
                                         "--out", str(out), "--no-progress"], capsys)
    assert code == 2, err
    _one_line(err)


# ------------------------------------------------------------------------------------------- PanNuke .npy

shapes = st.lists(st.integers(0, 4), min_size=0, max_size=5).map(tuple)


@BOUNDED
@given(shape=shapes, dtype=st.sampled_from(["float64", "uint8", "int16", "U3", "object"]),
       types_len=st.integers(0, 3))
def test_wrong_shaped_npy_is_a_one_line_error(tmp_path_factory, capsys, shape, dtype, types_len):
    tmp = tmp_path_factory.mktemp("pannuke")
    fold = tmp / "src" / "Fold 1"
    (fold / "images" / "fold1").mkdir(parents=True)
    (fold / "masks" / "fold1").mkdir(parents=True)
    arr = np.zeros(shape, dtype=dtype) if dtype != "object" else np.empty(shape, dtype=object)
    np.save(fold / "images" / "fold1" / "images.npy", arr, allow_pickle=dtype == "object")
    np.save(fold / "images" / "fold1" / "types.npy", np.array(["Breast"] * types_len))
    np.save(fold / "masks" / "fold1" / "masks.npy", np.zeros(shape[:3] + (6,) if len(shape) >= 3 else shape))
    out = tmp / "out"
    code, err = _run_confined(tmp, out, ["prep", "pannuke", "--src", str(tmp / "src"), "--out", str(out),
                                         "--no-progress"], capsys)
    assert code == 2, err
    _one_line(err)


# ------------------------------------------------------------------------------------------- Parquet schema

field_types = st.sampled_from([pa.int64(), pa.string(), pa.binary(), pa.float32(), pa.list_(pa.int8())])


@BOUNDED
@given(drop=st.sets(st.sampled_from(IMAGE_SCHEMA.names), max_size=3),
       retype=st.dictionaries(st.sampled_from(IMAGE_SCHEMA.names), field_types, max_size=2))
def test_parquet_with_the_wrong_schema_is_a_one_line_error(tmp_path_factory, capsys, drop, retype):
    tmp = tmp_path_factory.mktemp("schema")
    data = _dataset(str(tmp / "data"), n=3)
    m = read_manifest(data)
    path = Path(data) / m.shards[0].name
    table = pq.read_table(path)
    changed = False
    for name, tp in retype.items():
        if name in drop or table.schema.field(name).type == tp:
            continue
        table = table.set_column(table.schema.get_field_index(name), name, pa.nulls(table.num_rows, tp))
        changed = True
    for name in drop:
        table = table.drop_columns([name])
        changed = True
    if not changed:
        return
    pq.write_table(table, path)
    # the manifest is rewritten to match the new bytes: only the schema is wrong, not the checksum
    import hashlib

    text = json.loads((Path(data) / "_manifest.json").read_text())
    raw = path.read_bytes()
    text["shards"][0].update(sha256=hashlib.sha256(raw).hexdigest(), bytes=len(raw),
                             row_groups=[pq.ParquetFile(path).metadata.row_group(i).num_rows
                                         for i in range(pq.ParquetFile(path).num_row_groups)])
    (Path(data) / "_manifest.json").write_text(json.dumps(text))
    out = tmp / "emb"
    code, err = _run_confined(tmp, out, ["embed", "--baseline", "--data", data, "--out", str(out)] + EMBED, capsys)
    assert code == 2, err
    assert m.shards[0].name in _one_line(err)


# ------------------------------------------------------------------------------------------- sample ids

hostile_ids = st.sampled_from(["../../escape", "/abs/path", "a/../../b", "..", "~/home", "x" * 300, "nul\x00byte",
                               "new\nline", "s3://bucket/key", "C:\\win\\path", "ünï/çødé", "%2e%2e%2f"])


@BOUNDED
@given(ids=st.lists(hostile_ids, min_size=2, max_size=4, unique=True))
def test_hostile_sample_ids_never_become_paths(tmp_path_factory, capsys, ids):
    tmp = tmp_path_factory.mktemp("ids")
    data = _dataset(str(tmp / "data"), {sid: _png(i) for i, sid in enumerate(ids)})
    out = tmp / "emb"
    code, err = _run_confined(tmp, out, ["embed", "--baseline", "--data", data, "--out", str(out)] + EMBED, capsys)
    assert code == 0, err
    from lgff_core.data.embeddings import read_embeddings

    assert sorted(read_embeddings(str(out)).ids.tolist()) == sorted(ids)


# ------------------------------------------------------------------------------------------- symlink loops


@BOUNDED
@given(depth=st.integers(1, 3), up=st.integers(0, 3))
def test_symlink_loops_are_one_line_errors(tmp_path_factory, capsys, depth, up):
    tmp = tmp_path_factory.mktemp("loop")
    leaf = tmp / "src" / "a"
    for d in range(depth - 1):
        leaf = leaf / f"d{d}"
    leaf.mkdir(parents=True)
    (tmp / "src" / "a" / "x.png").write_bytes(_png(3))
    (tmp / "src" / "b").mkdir()
    (tmp / "src" / "b" / "y.png").write_bytes(_png(4))
    up = min(up, depth)  # stay inside src/: ".." x up from the leaf
    os.symlink("/".join([".."] * up) or ".", leaf / "loop")
    out = tmp / "out"
    code, err = _run_confined(tmp, out, ["prep", "imagefolder", "--src", str(tmp / "src"), "--out", str(out),
                                         "--no-progress"], capsys)
    assert code == 2, err
    assert "symlink loop" in _one_line(err)
