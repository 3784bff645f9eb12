"""Bad input: a clear error naming the file / row, exit code 2 from the CLI, and no _manifest.json published."""
import json

import numpy as np
import pytest

from lgff_core.cli import main
from lgff_core.data import read_manifest, read_table
from lgff_core.data.convert import ConvertOptions, Task, write_dataset
from lgff_core.data.testing import make_coco_tree, make_imagefolder_tree, make_pannuke_tree
from lgff_core.errors import DataError


def _run(capsys, *argv):
    code = main(["-q", *argv, *(["--no-progress"] if argv[0] == "prep" else [])])
    return code, capsys.readouterr().err


def _no_manifest(out):
    assert not (out / "_manifest.json").exists()


@pytest.mark.parametrize("damage", ["corrupt", "truncated"])
def test_bad_image_fails_naming_the_file(tmp_path, capsys, damage):
    src = make_imagefolder_tree(tmp_path / "src", per_class=3, fmt="jpg", size=(64, 64))
    bad = src / "dog" / "001.jpg"
    data = bad.read_bytes()
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg" if damage == "corrupt" else data[: len(data) // 2])
    out = tmp_path / "out"
    code, err = _run(capsys, "prep", "imagefolder", "--src", str(src), "--out", str(out), "--shard-mb", "0.001")
    assert code == 2 and str(bad) in err and "decodable" in err
    _no_manifest(out)
    assert not list(out.glob("part-*.parquet"))  # parts written before the failure are not left as a dataset
    # skip mode converts the rest and records the bad file with its reason
    code, _ = _run(capsys, "prep", "imagefolder", "--src", str(src), "--out", str(out), "--on-error", "skip")
    m = read_manifest(str(out))
    assert code == 0 and m.num_rows == 8 and [s["input"] for s in m.skipped] == [str(bad)]
    assert "dog/001.jpg" not in read_table(str(out), columns=["sample_id"]).column("sample_id").to_pylist()


def test_empty_class_folder(tmp_path, capsys):
    src = make_imagefolder_tree(tmp_path / "src", per_class=2)
    (src / "zebra").mkdir()
    out = tmp_path / "out"
    code, err = _run(capsys, "prep", "imagefolder", "--src", str(src), "--out", str(out))
    assert code == 2 and "zebra" in err and "no images" in err
    _no_manifest(out)


def test_truncated_npy(tmp_path, capsys):
    src = make_pannuke_tree(tmp_path / "pn", folds=(1,))
    f = src / "Fold 1" / "images" / "fold1" / "images.npy"
    f.write_bytes(f.read_bytes()[:-500])
    out = tmp_path / "out"
    code, err = _run(capsys, "prep", "pannuke", "--src", str(src), "--out", str(out))
    assert code == 2 and str(f) in err and "truncated" in err
    _no_manifest(out)


def test_misshaped_npy(tmp_path, capsys):
    src = make_pannuke_tree(tmp_path / "pn", folds=(1,), n_per_fold=2, size=16)
    masks = src / "Fold 1" / "masks" / "fold1" / "masks.npy"
    np.save(masks, np.zeros((2, 16, 16, 5)))  # 5 channels instead of 6
    out = tmp_path / "out"
    code, err = _run(capsys, "prep", "pannuke", "--src", str(src), "--out", str(out), "--mode", "nuclei")
    assert code == 2 and str(masks) in err and "(2, 16, 16, 5)" in err
    types = src / "Fold 1" / "images" / "fold1" / "types.npy"
    np.save(types, np.array(["Breast"] * 3))
    code, err = _run(capsys, "prep", "pannuke", "--src", str(src), "--out", str(out))
    assert code == 2 and "3 tissue names" in err and "2 patches" in err
    _no_manifest(out)


def test_coco_annotation_points_to_missing_image(tmp_path, capsys):
    images_dir, ann_file = make_coco_tree(tmp_path / "coco")
    (images_dir / "000001.jpg").unlink()
    out = tmp_path / "out"
    code, err = _run(capsys, "prep", "coco", "--images", str(images_dir), "--annotations", str(ann_file),
                     "--out", str(out))
    assert code == 2 and "000001.jpg" in err and "not found" in err and "annotation id(s) [104, 105]" in err
    _no_manifest(out)
    data = json.loads(ann_file.read_text())
    data["annotations"].append({"id": 999, "image_id": 4242, "category_id": 1, "bbox": [0, 0, 1, 1]})
    ann_file.write_text(json.dumps(data))
    code, err = _run(capsys, "prep", "coco", "--images", str(images_dir), "--annotations", str(ann_file),
                     "--out", str(out))
    assert code == 2 and "annotation id 999 points to image_id 4242" in err
    _no_manifest(out)


def test_malformed_and_duplicate_coco_json(tmp_path, capsys):
    images_dir, ann_file = make_coco_tree(tmp_path / "coco")
    good = ann_file.read_text()
    ann_file.write_text(good[:-40])
    out = tmp_path / "out"
    argv = ["prep", "coco", "--images", str(images_dir), "--annotations", str(ann_file), "--out", str(out)]
    code, err = _run(capsys, *argv)
    assert code == 2 and str(ann_file) in err and "malformed JSON at line 1" in err
    data = json.loads(good)
    data["images"].append(dict(data["images"][0]))
    ann_file.write_text(json.dumps(data))
    code, err = _run(capsys, *argv)
    assert code == 2 and "images[3] has duplicate id 10" in err
    _no_manifest(out)


def _row(split="train"):
    return {"image": b"x", "label": 0, "label_name": "a", "group": "g", "split": split, "width": 1, "height": 1}


def test_duplicate_sample_id_is_rejected(tmp_path):
    tasks = [Task("same", "input-1", _row), Task("same", "input-2", _row)]
    with pytest.raises(DataError, match="duplicate sample_id 'same': input-1 and input-2"):
        write_dataset(str(tmp_path / "out"), tasks, converter="t", params={}, source_fingerprint="f",
                      label_names=["a"], options=ConvertOptions())
    _no_manifest(tmp_path / "out")


def test_output_prefix_holding_another_dataset(tmp_path, capsys):
    a = make_imagefolder_tree(tmp_path / "a", per_class=2)
    b = make_imagefolder_tree(tmp_path / "b", per_class=3)
    out = tmp_path / "out"
    assert _run(capsys, "prep", "imagefolder", "--src", str(a), "--out", str(out))[0] == 0
    manifest_before = (out / "_manifest.json").read_text()
    code, err = _run(capsys, "prep", "imagefolder", "--src", str(b), "--out", str(out))
    assert code == 2 and "already holds a different dataset" in err and str(out) in err
    assert (out / "_manifest.json").read_text() == manifest_before  # untouched
    assert _run(capsys, "prep", "imagefolder", "--src", str(a), "--out", str(out))[0] == 0  # same data: no-op


def test_verify_detects_a_modified_shard(tmp_path, capsys):
    src = make_imagefolder_tree(tmp_path / "src", per_class=2)
    out = tmp_path / "out"
    assert _run(capsys, "prep", "imagefolder", "--src", str(src), "--out", str(out))[0] == 0
    assert main(["data", "verify", str(out)]) == 0
    part = out / "part-00000.parquet"
    raw = bytearray(part.read_bytes())
    raw[100] ^= 0xFF
    part.write_bytes(bytes(raw))
    code, err = _run(capsys, "data", "verify", str(out))
    assert code == 2 and "part-00000.parquet: sha256" in err
    code, err = _run(capsys, "data", "info", str(tmp_path / "nothing"))
    assert code == 2 and "not a dataset" in err
