"""`lgff prep samples`: the real sample sets from the histolytics / stardist data files (read by path)."""
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from lgff_core.cli import main
from lgff_core.data import decode_image, read_manifest, read_table
from lgff_core.data.converters import samples

# pycocotools 2.0 calls np.array(copy=False) internally (numpy 2 deprecation), not our code
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("samples") / "sets"
    assert main(["-q", "prep", "samples", "--out", str(out), "--no-progress"]) == 0
    return out


def test_wkb_and_centroid_reference():
    import struct

    square = [(0.0, 0.0), (4.0, 0.0), (4.0, 2.0), (0.0, 2.0), (0.0, 0.0)]
    wkb = struct.pack("<BII", 1, 3, 1) + struct.pack("<I", 5) + b"".join(struct.pack("<dd", *p) for p in square)
    (rings,) = samples.read_wkb_polygons(wkb)
    assert rings[0].shape == (5, 2) and samples.polygon_centroid(rings[0]) == pytest.approx((2.0, 1.0))
    tri = np.array([[0, 0], [3, 0], [0, 3], [0, 0]], dtype=float)
    assert samples.polygon_centroid(tri) == pytest.approx((1.0, 1.0))


def test_nuclei_set(built):
    m = read_manifest(str(built / "histolytics-nuclei"))
    assert m.label_names == ["connective", "inflammatory", "neoplastic"]
    assert m.num_rows > 1200 and set(m.split_counts) == {"train", "val", "test"}
    t = read_table(str(built / "histolytics-nuclei"), columns=["label", "group", "split", "width", "height"])
    assert set(t.column("group").to_pylist()) == {"hgsc_nest", "hgsc_stromal_he"}
    assert set(t.column("width").to_pylist()) == {64} == set(t.column("height").to_pylist())
    for split in ("train", "val", "test"):
        labels = {lab for lab, s in zip(t.column("label").to_pylist(), t.column("split").to_pylist()) if s == split}
        assert labels == {0, 1, 2}, split


def test_nuclei_splits_share_no_pixels():
    tasks, _ = samples._nuclei_tasks(samples.sample_files(), crop_size=64, seed=0)
    by_image = {}
    for t in tasks:
        image_path, box, _, _, group, split = t.args
        by_image.setdefault(group, []).append((box, split))
    for group, items in by_image.items():
        boxes = np.array([b for b, _ in items])
        splits = np.array([s for _, s in items])
        overlap = ((boxes[:, None, 0] < boxes[None, :, 2]) & (boxes[None, :, 0] < boxes[:, None, 2])
                   & (boxes[:, None, 1] < boxes[None, :, 3]) & (boxes[None, :, 1] < boxes[:, None, 3]))
        assert not (overlap & (splits[:, None] != splits[None, :])).any(), group


def test_tissue_set_tiles_match_source(built):
    uri = str(built / "histolytics-tissue")
    m = read_manifest(uri)
    # 160 px tiles: 9 x 9 per 1500 px image, 3 x 3 per split block, 2 of the 9 blocks per image in val and in test
    assert m.label_names == ["stroma", "tumor-nest"] and m.num_rows == 162
    assert m.split_counts == {"train": 90, "val": 36, "test": 36}
    row = next(r for r in read_table(uri).to_pylist() if r["sample_id"] == "hgsc_nest/tile-01-02")
    src = np.asarray(Image.open(samples.sample_files()["histolytics/hgsc_nest.jpg"]).convert("RGB"))
    assert row["label_name"] == "tumor-nest" and row["group"] == "hgsc_nest"
    assert np.array_equal(np.asarray(decode_image(row["image"])), src[160:320, 320:480])


def test_tissue_tiles_stay_inside_one_split_block():
    tasks, _ = samples._tissue_tasks(samples.sample_files(), tile=160, seed=0)
    for image in samples.HISTOLYTICS_IMAGES:
        stem = image.rsplit(".", 1)[0]
        items = [(t.args[1], t.args[5]) for t in tasks if t.args[4] == stem]
        boxes = np.array([b for b, _ in items])
        splits = np.array([s for _, s in items])
        assert len(items) == 81 and (boxes[:, 2:] - boxes[:, :2] == 160).all() and boxes.max() <= 1500
        # the split blocks are 3 x 3 tiles (480 px): each block holds one split, which is block_splits' deal
        deal = samples.block_splits(3, 0, stem)
        for (y0, x0, _, _), split in items:
            assert split == deal[(y0 // 480, x0 // 480)]
        assert sorted((splits == s).sum() for s in ("train", "val", "test")) == [18, 18, 45]
        # no pixel is shared between splits: tiles of different splits never overlap
        overlap = ((boxes[:, None, 0] < boxes[None, :, 2]) & (boxes[None, :, 0] < boxes[:, None, 2])
                   & (boxes[:, None, 1] < boxes[None, :, 3]) & (boxes[None, :, 1] < boxes[:, None, 3]))
        assert not (overlap & (splits[:, None] != splits[None, :])).any(), stem


def test_coco_set(built):
    uri = str(built / "nuclei-coco")
    m = read_manifest(uri)
    assert m.kind == "coco" and m.num_rows == 19
    rows = read_table(uri).to_pylist()
    star = next(r for r in rows if r["sample_id"] == "stardist-img2d")
    assert (star["width"], star["height"]) == (512, 512) and len(star["annotations"]) == 125
    assert {a["category_id"] for a in star["annotations"]} == {4}
    cats = set()
    for r in rows:
        for a in r["annotations"]:
            rle = {"size": a["segmentation_rle"]["size"], "counts": a["segmentation_rle"]["counts"].encode()}
            assert mask_utils.decode(rle).sum() == a["area"] >= 10
            assert list(mask_utils.toBbox(rle)) == a["bbox"]
            cats.add(a["category_id"])
    assert cats == {1, 2, 3, 4}
    nest = sum(len(r["annotations"]) for r in rows if r["group"] == "hgsc_nest")
    assert 1250 <= nest <= 1400  # 1,294 instances, a few split by tile borders or below min_area
