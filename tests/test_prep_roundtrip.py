"""Converters on tiny trees in the real layouts: read back gives the same pixels, labels and annotations, and the
output is byte-deterministic."""
import json

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from lgff_core.data import decode_image, read_manifest, read_table, verify_dataset
from lgff_core.data.convert import ConvertOptions
from lgff_core.data.converters.coco import convert_coco, row_annotation_to_coco
from lgff_core.data.converters.folders import convert_imagefolder, convert_kimia
from lgff_core.data.converters.pannuke import CELL_TYPES, convert_pannuke
from lgff_core.data.testing import (
    make_coco_tree,
    make_imagefolder_tree,
    make_kimia_tree,
    make_pannuke_tree,
)

# pycocotools 2.0 calls np.array(copy=False) internally (numpy 2 deprecation), not our code
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _rows(uri):
    return read_table(uri).to_pylist()


def test_imagefolder_roundtrip_keeps_original_bytes(tmp_path):
    src = make_imagefolder_tree(tmp_path / "src", classes=("b_cls", "a_cls"), per_class=3, fmt="png")
    # a TIFF is re-encoded as lossless PNG
    tif = np.random.default_rng(1).integers(0, 255, (20, 24, 3), dtype=np.uint8)
    Image.fromarray(tif).save(src / "a_cls" / "extra.tif")
    (src / "a_cls" / "notes.txt").write_text("ignored")
    m = convert_imagefolder(src, str(tmp_path / "out"), ConvertOptions(shard_mb=0.004))
    assert m.label_names == ["a_cls", "b_cls"] and m.num_rows == 7 and m.num_shards > 1
    rows = _rows(str(tmp_path / "out"))
    assert [r["sample_id"] for r in rows] == sorted(r["sample_id"] for r in rows)
    for r in rows:
        if r["sample_id"].endswith(".png"):
            assert r["image"] == (src / r["sample_id"]).read_bytes()
        else:
            assert r["image"][:8] == b"\x89PNG\r\n\x1a\n"
            assert np.array_equal(np.asarray(decode_image(r["image"])), tif)
        assert r["label_name"] == r["sample_id"].split("/")[0] and r["label"] == m.label_names.index(r["label_name"])
        assert r["split"] == "train" and (r["width"], r["height"]) == Image.open(src / r["sample_id"]).size
    assert verify_dataset(str(tmp_path / "out")) == []


def test_kimia_roundtrip_labels_are_scan_ids(tmp_path):
    src = make_kimia_tree(tmp_path / "kimia", scans=(0, 1, 5), train_per_scan=2, test_per_scan=1)
    m = convert_kimia(src, str(tmp_path / "out"), ConvertOptions())
    assert m.label_names == [f"s{i}" for i in range(6)]
    assert m.split_counts == {"test": 3, "train": 6}
    for r in _rows(str(tmp_path / "out")):
        split, scan, _ = r["sample_id"].split("/")
        assert r["split"] == split and r["group"] == scan and r["label"] == int(scan[1:])
        assert r["image"] == (src / r["sample_id"]).read_bytes()  # JPEG kept byte-exact


def test_pannuke_tissue_and_nuclei_roundtrip(tmp_path):
    src = make_pannuke_tree(tmp_path / "pn", folds=(1, 2), n_per_fold=3, size=32)
    m = convert_pannuke(src, str(tmp_path / "tissue"), ConvertOptions(), mode="tissue")
    assert m.num_rows == 6 and m.split_counts == {"train": 3, "val": 3}
    images = np.load(src / "Fold 2" / "images" / "fold2" / "images.npy")
    types = np.load(src / "Fold 2" / "images" / "fold2" / "types.npy")
    for r in _rows(str(tmp_path / "tissue")):
        fold, idx = r["sample_id"].split("/")
        if fold == "fold2":
            assert np.array_equal(np.asarray(decode_image(r["image"])), images[int(idx)].astype(np.uint8))
            assert r["label_name"] == types[int(idx)] and m.label_names[r["label"]] == r["label_name"]
    m = convert_pannuke(src, str(tmp_path / "nuclei"), ConvertOptions(), mode="nuclei", crop_size=16, min_area=4)
    rows = _rows(str(tmp_path / "nuclei"))
    assert m.num_rows == 12 and m.label_names == list(CELL_TYPES)  # 2 nuclei x 6 patches
    neo = [r for r in rows if r["label_name"] == "Neoplastic"]
    con = [r for r in rows if r["label_name"] == "Connective"]
    assert len(neo) == len(con) == 6 and {r["label"] for r in con} == {2}
    r = next(r for r in neo if r["sample_id"].startswith("fold2/00001/"))
    assert r["group"] == "fold2/00001" and (r["width"], r["height"]) == (16, 16)
    # 6x6 nucleus at rows/cols 4..9, centroid 6.5 -> crop window starts at 0 (clamped to the patch)
    assert np.array_equal(np.asarray(decode_image(r["image"])), images[1, 0:16, 0:16].astype(np.uint8))


def test_coco_roundtrip_keeps_polygons_and_rle(tmp_path):
    images_dir, ann_file = make_coco_tree(tmp_path / "coco", n_images=3)
    m = convert_coco(images_dir, ann_file, str(tmp_path / "out"), ConvertOptions())
    assert m.kind == "coco" and m.num_rows == 3 and m.split_counts == {"val": 3}
    assert [c["name"] for c in m.extra["categories"]] == ["tumor", "lymphocyte"]
    src = json.loads(ann_file.read_text())
    by_id = {a["id"]: a for a in src["annotations"]}
    rows = _rows(str(tmp_path / "out"))
    n_anns = 0
    for r in rows:
        info = next(i for i in src["images"] if i["id"] == r["image_id"])
        assert r["image"] == (images_dir / info["file_name"]).read_bytes()
        for a in r["annotations"]:
            n_anns += 1
            orig = by_id[a["id"]]
            back = row_annotation_to_coco(a, r["image_id"])
            assert back["bbox"] == orig["bbox"] and back["category_id"] == orig["category_id"]
            assert back["iscrowd"] == orig["iscrowd"] and back["area"] == orig["area"]
            if isinstance(orig["segmentation"], list):
                assert back["segmentation"] == orig["segmentation"]
            else:  # same mask whether the source RLE was compressed or not
                h, w = orig["segmentation"]["size"]
                seg = orig["segmentation"]
                if isinstance(seg["counts"], list):
                    want = mask_utils.decode(mask_utils.frPyObjects(seg, h, w))
                else:
                    want = mask_utils.decode({"size": seg["size"], "counts": seg["counts"].encode()})
                got = mask_utils.decode({"size": back["segmentation"]["size"],
                                         "counts": back["segmentation"]["counts"].encode()})
                assert np.array_equal(want, got) and want.sum() > 0
    assert n_anns == len(src["annotations"]) == 7


def test_same_input_gives_identical_shards_and_rerun_is_noop(tmp_path):
    src = make_imagefolder_tree(tmp_path / "src", per_class=4, fmt="jpg")
    a = convert_imagefolder(src, str(tmp_path / "a"), ConvertOptions(shard_mb=0.003))
    b = convert_imagefolder(src, str(tmp_path / "b"), ConvertOptions(shard_mb=0.003, workers=2))
    assert a.num_shards > 2
    assert [s.sha256 for s in a.shards] == [s.sha256 for s in b.shards]
    assert (tmp_path / "a" / "_manifest.json").read_text() == (tmp_path / "b" / "_manifest.json").read_text()
    before = (tmp_path / "a" / "part-00000.parquet").stat().st_mtime_ns
    again = convert_imagefolder(src, str(tmp_path / "a"), ConvertOptions(shard_mb=0.003))
    assert again.source_fingerprint == a.source_fingerprint
    assert (tmp_path / "a" / "part-00000.parquet").stat().st_mtime_ns == before  # nothing rewritten
    assert read_manifest(str(tmp_path / "a")).num_rows == 12


def test_imagefolder_split_fractions_are_seeded(tmp_path):
    from lgff_core.cli import main

    src = make_imagefolder_tree(tmp_path / "src", per_class=20, size=(16, 16))

    def splits(out, seed):
        argv = ["-q", "prep", "imagefolder", "--src", str(src), "--out", str(out), "--no-progress",
                "--split-fractions", "train=0.6,val=0.2,test=0.2", "--seed", str(seed)]
        assert main(argv) == 0
        t = read_table(str(out), columns=["sample_id", "split"])
        return dict(zip(t.column("sample_id").to_pylist(), t.column("split").to_pylist()))

    a, b, c = splits(tmp_path / "a", 0), splits(tmp_path / "b", 0), splits(tmp_path / "c", 1)
    assert a == b and a != c
    counts = {s: list(a.values()).count(s) for s in ("train", "val", "test")}
    assert sum(counts.values()) == 60 and counts["train"] > counts["val"] > 0 and counts["test"] > 0
    assert main(["-q", "prep", "imagefolder", "--src", str(src), "--out", str(tmp_path / "d"),
                 "--split-fractions", "train=0.6,val=0.6"]) == 2


def test_tree_walk_yields_sample_id_order_for_tricky_names(tmp_path):
    src = make_imagefolder_tree(tmp_path / "src", classes=("a", "a.b", "a-c"), per_class=1, size=(8, 8))
    for rel in ("a/sub/x.png", "a/sub.png", "a/sub-y.png", "a.b/z/0.png"):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(src / rel)
    m = convert_imagefolder(src, str(tmp_path / "out"), ConvertOptions())
    ids = read_table(str(tmp_path / "out"), columns=["sample_id"]).column("sample_id").to_pylist()
    assert m.num_rows == 7 and ids == sorted(ids) and "a/sub/x.png" in ids
