"""Tiny source trees in the real layouts (Kimia, PanNuke, COCO, ImageFolder) and a tiny dataset, for tests.

Everything is synthetic and seeded (numpy pixels), a few KB in size, so any test can build a real dataset in
milliseconds: ``make_tiny_dataset(tmp_path / "ds")`` -> the URI of a converted ImageFolder dataset.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["make_imagefolder_tree", "make_kimia_tree", "make_pannuke_tree", "make_coco_tree", "make_tiny_dataset",
           "PANNUKE_TISSUES"]

PANNUKE_TISSUES = ("Adrenal_gland", "Breast", "Colon")


def _pattern(rng: np.random.Generator, h: int, w: int, cls: int) -> np.ndarray:
    """A class-dependent image: a base colour per class plus noise (so classes are separable)."""
    base = np.array([(60 * cls) % 256, (110 + 70 * cls) % 256, (200 - 50 * cls) % 256], dtype=np.float64)
    img = base + rng.normal(0, 20, size=(h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def make_imagefolder_tree(root: str | os.PathLike, classes=("cat", "dog", "eel"), per_class: int = 4,
                          size: tuple[int, int] = (40, 32), fmt: str = "png", seed: int = 0,
                          splits: tuple[str, ...] | None = None) -> Path:
    """root/<class>/<i>.<fmt> (or root/<split>/<class>/<i>.<fmt> when `splits` is given)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for split in splits or (None,):
        base = root / split if split else root
        for ci, cls in enumerate(classes):
            d = base / cls
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                img = Image.fromarray(_pattern(rng, size[1], size[0], ci))
                if fmt in ("jpg", "jpeg"):
                    img.save(d / f"{i:03d}.{fmt}", format="JPEG", quality=90)
                else:
                    img.save(d / f"{i:03d}.{fmt}")
    return root


def make_kimia_tree(root: str | os.PathLike, scans=(0, 1, 5), train_per_scan: int = 3, test_per_scan: int = 1,
                    size: int = 48, seed: int = 0) -> Path:
    """root/train/s<k>/*.jpg and root/test/s<k>/*.jpg (Kimia Path24C layout, smaller patches)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for split, n in (("train", train_per_scan), ("test", test_per_scan)):
        for s in scans:
            d = root / split / f"s{s}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(_pattern(rng, size, size, s)).save(d / f"s{s}_{split}_{i}.jpg", quality=92)
    return root


def make_pannuke_tree(root: str | os.PathLike, folds=(1, 2), n_per_fold: int = 3, size: int = 32,
                      seed: int = 0) -> Path:
    """root/Fold k/images/foldk/{images,types}.npy and root/Fold k/masks/foldk/masks.npy (float64 like PanNuke).

    Each patch gets two nuclei: a 6x6 square of channel 0 (Neoplastic, id 1) and a 5x5 square of channel 2
    (Connective, id 3); channel 5 is background.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    for k in folds:
        img_dir = root / f"Fold {k}" / "images" / f"fold{k}"
        mask_dir = root / f"Fold {k}" / "masks" / f"fold{k}"
        img_dir.mkdir(parents=True, exist_ok=True)
        mask_dir.mkdir(parents=True, exist_ok=True)
        images = np.stack([_pattern(rng, size, size, i) for i in range(n_per_fold)]).astype(np.float64)
        types = np.array([PANNUKE_TISSUES[(i + k) % len(PANNUKE_TISSUES)] for i in range(n_per_fold)])
        masks = np.zeros((n_per_fold, size, size, 6), dtype=np.float64)
        masks[:, 4:10, 4:10, 0] = 1
        masks[:, 20:25, 18:23, 2] = 3
        masks[..., 5] = (masks[..., :5].sum(-1) == 0).astype(np.float64)
        np.save(img_dir / "images.npy", images)
        np.save(img_dir / "types.npy", types)
        np.save(mask_dir / "masks.npy", masks)
    return root


def make_coco_tree(root: str | os.PathLike, n_images: int = 3, size: tuple[int, int] = (48, 40),
                   seed: int = 0) -> tuple[Path, Path]:
    """root/images/*.jpg and root/annotations/instances_val.json with polygon, compressed RLE and uncompressed RLE
    annotations. Returns (images_dir, annotations_file)."""
    from pycocotools import mask as mask_utils

    root = Path(root)
    rng = np.random.default_rng(seed)
    images_dir = root / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(exist_ok=True)
    w, h = size
    images, anns = [], []
    ann_id = 100
    for i in range(n_images):
        name = f"{i:06d}.jpg"
        Image.fromarray(_pattern(rng, h, w, i)).save(images_dir / name, quality=90)
        image_id = 10 + i
        images.append({"id": image_id, "file_name": name, "width": w, "height": h})
        ann_id += 1
        anns.append({"id": ann_id, "image_id": image_id, "category_id": 1, "iscrowd": 0,
                     "segmentation": [[2.0, 2.0, 12.5, 2.0, 12.5, 10.0, 2.0, 10.0]], "bbox": [2.0, 2.0, 10.5, 8.0],
                     "area": 84.0})
        m = np.zeros((h, w), dtype=np.uint8)
        m[15:25, 20:30] = 1
        rle = mask_utils.encode(np.asfortranarray(m))
        ann_id += 1
        anns.append({"id": ann_id, "image_id": image_id, "category_id": 2, "iscrowd": 0,
                     "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()},
                     "bbox": [20.0, 15.0, 10.0, 10.0], "area": 100.0})
        if i == 0:  # uncompressed RLE (crowd), as COCO stores some crowd regions
            m2 = np.zeros((h, w), dtype=np.uint8)
            m2[30:35, 5:9] = 1
            flat = m2.flatten(order="F")
            counts, prev, run = [], 0, 0
            for v in flat:
                if v != prev:
                    counts.append(run)
                    run, prev = 0, v
                run += 1
            counts.append(run)
            ann_id += 1
            anns.append({"id": ann_id, "image_id": image_id, "category_id": 2, "iscrowd": 1,
                         "segmentation": {"size": [h, w], "counts": counts}, "bbox": [5.0, 30.0, 4.0, 5.0],
                         "area": 20.0})
    data = {"images": images, "annotations": anns,
            "categories": [{"id": 1, "name": "tumor", "supercategory": "cell"},
                           {"id": 2, "name": "lymphocyte", "supercategory": "cell"}]}
    ann_file = root / "annotations" / "instances_val.json"
    ann_file.write_text(json.dumps(data))
    return images_dir, ann_file


def make_tiny_dataset(out_uri: str | os.PathLike, src_dir: str | os.PathLike | None = None, classes=("a", "b", "c"),
                      per_class: int = 6, size: tuple[int, int] = (32, 32), shard_mb: float = 0.01) -> str:
    """Convert a synthetic ImageFolder (train/val/test split folders) into a dataset at `out_uri`; returns it."""
    from .convert import ConvertOptions
    from .converters.folders import convert_imagefolder

    out_uri = str(out_uri)
    if src_dir is None and "://" in out_uri and not out_uri.startswith("file://"):
        raise ValueError("make_tiny_dataset: pass src_dir (a local directory) when out_uri is an object-store URI")
    src = Path(src_dir) if src_dir else Path(out_uri.removeprefix("file://").rstrip("/") + "-src")
    if not src.exists():
        make_imagefolder_tree(src, classes=classes, per_class=per_class, size=size, splits=("train", "val", "test"))
    convert_imagefolder(src, out_uri, ConvertOptions(shard_mb=shard_mb))
    return out_uri
