"""COCO (images dir + ``instances_*.json``) -> dataset with an ``annotations`` column (DESIGN.md section 4).

The JSON is indexed with pycocotools' `COCO`. Each image becomes one row (original bytes) with ``image_id`` and
its annotations: ``bbox`` [x, y, w, h], ``area``, ``iscrowd``, ``category_id`` and the segmentation kept in its own
form: polygons in ``segmentation_polygons``, RLE in ``segmentation_rle`` as *compressed* COCO RLE
(uncompressed count lists are compressed with `pycocotools.mask.frPyObjects`; counts stored as a string).
Image-level ``label`` is -1 (no image label); categories go to the manifest (``extra.categories``).
Split: ``--split``, else guessed from the annotation file name (``instances_val2017.json`` -> val), else train.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Optional

from ...errors import DataError
from ..convert import ConvertOptions, RowError, Task, fingerprint, write_dataset
from ..images import DEFAULT_MAX_PIXELS, ImageCheckError, describe_error, probe_image
from ..shards import COCO_SCHEMA, Manifest

__all__ = ["convert_coco", "load_coco_json", "annotation_to_row", "row_annotation_to_coco"]

log = logging.getLogger(__name__)


def load_coco_json(path: str | os.PathLike):
    """A pycocotools `COCO` for `path`, with malformed input reported as `DataError` naming file / line / key."""
    from pycocotools.coco import COCO

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read annotation file: {exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: top level must be an object with 'images', 'annotations', 'categories'")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key, []), list):
            raise DataError(f"{path}: '{key}' must be a list")
    for i, img in enumerate(data.get("images", [])):
        if not isinstance(img, dict) or "id" not in img or "file_name" not in img:
            raise DataError(f"{path}: images[{i}] needs 'id' and 'file_name'")
    for i, ann in enumerate(data.get("annotations", [])):
        if not isinstance(ann, dict) or "image_id" not in ann or "id" not in ann:
            raise DataError(f"{path}: annotations[{i}] needs 'id' and 'image_id'")
    def _int(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    def _num(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    for i, img in enumerate(data.get("images", [])):
        if not _int(img["id"]) or not isinstance(img["file_name"], str) or not img["file_name"]:
            raise DataError(f"{path}: images[{i}] needs an integer 'id' and a non-empty string 'file_name'")
        for key in ("width", "height"):
            if key in img and not (_int(img[key]) and img[key] >= 0):
                raise DataError(f"{path}: images[{i}].{key} must be a non-negative integer, got {img[key]!r}")
    for i, ann in enumerate(data.get("annotations", [])):
        if not _int(ann["id"]) or not _int(ann["image_id"]) or not _int(ann.get("category_id", 0)):
            raise DataError(f"{path}: annotations[{i}] 'id', 'image_id' and 'category_id' must be integers")
        if "bbox" in ann and not (isinstance(ann["bbox"], list) and len(ann["bbox"]) == 4
                                  and all(_num(v) for v in ann["bbox"])):
            raise DataError(f"{path}: annotations[{i}].bbox must be [x, y, width, height], got {ann['bbox']!r}")
        for key in ("area", "iscrowd"):
            if key in ann and not _num(ann[key]):
                raise DataError(f"{path}: annotations[{i}].{key} must be a number, got {ann[key]!r}")
        if "segmentation" in ann and not isinstance(ann["segmentation"], (list, dict)):
            raise DataError(f"{path}: annotations[{i}].segmentation must be polygons or RLE")
    for i, cat in enumerate(data.get("categories", [])):
        if not isinstance(cat, dict) or not _int(cat.get("id")):
            raise DataError(f"{path}: categories[{i}] needs an integer 'id'")
    for key in ("images", "annotations"):
        seen: dict = {}
        for i, item in enumerate(data.get(key, [])):
            if item["id"] in seen:
                raise DataError(f"{path}: {key}[{i}] has duplicate id {item['id']!r} (also {key}[{seen[item['id']]}])")
            seen[item["id"]] = i
    data.setdefault("annotations", [])
    data.setdefault("categories", [])
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco.createIndex()
    return coco


def annotation_to_row(ann: dict, height: int, width: int, where: str) -> dict:
    """A COCO annotation dict -> the shard's annotation struct (polygons / compressed RLE)."""
    from pycocotools import mask as mask_utils

    seg = ann.get("segmentation")
    polygons: Optional[list] = None
    rle: Optional[dict] = None
    if isinstance(seg, list):
        polygons = [[float(v) for v in poly] for poly in seg]
    elif isinstance(seg, dict):
        if "counts" not in seg or "size" not in seg:
            raise RowError(f"{where}: RLE segmentation needs 'counts' and 'size'")
        if isinstance(seg["counts"], list):  # uncompressed RLE -> compressed
            seg = mask_utils.frPyObjects(seg, int(seg["size"][0]), int(seg["size"][1]))
        counts = seg["counts"]
        rle = {"size": [int(v) for v in seg["size"]],
               "counts": counts.decode("ascii") if isinstance(counts, bytes) else str(counts)}
    elif seg is not None:
        raise RowError(f"{where}: segmentation must be a polygon list or an RLE object")
    bbox = ann.get("bbox")
    if bbox is None and rle is not None:
        bbox = mask_utils.toBbox({"size": rle["size"], "counts": rle["counts"].encode()}).tolist()
    if bbox is None or len(bbox) != 4:
        raise RowError(f"{where}: bbox must be [x, y, w, h]")
    return {
        "id": int(ann["id"]),
        "category_id": int(ann.get("category_id", 0)),
        "bbox": [float(v) for v in bbox],
        "area": float(ann.get("area", float(bbox[2]) * float(bbox[3]))),
        "iscrowd": int(ann.get("iscrowd", 0)),
        "segmentation_polygons": polygons,
        "segmentation_rle": rle,
    }


def row_annotation_to_coco(ann: dict, image_id: int) -> dict:
    """Inverse of `annotation_to_row`: a shard annotation struct -> a COCO annotation dict (for COCOeval)."""
    out: dict[str, Any] = {"id": ann["id"], "image_id": image_id, "category_id": ann["category_id"],
                           "bbox": list(ann["bbox"]), "area": ann["area"], "iscrowd": ann["iscrowd"]}
    if ann.get("segmentation_rle"):
        out["segmentation"] = {"size": list(ann["segmentation_rle"]["size"]),
                               "counts": ann["segmentation_rle"]["counts"]}
    elif ann.get("segmentation_polygons") is not None:
        out["segmentation"] = [list(p) for p in ann["segmentation_polygons"]]
    return out


def load_coco_image(path: str, image_id: int, annotations: list[dict], split: str, declared: tuple[int, int],
                    check: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> dict:
    if not os.path.isfile(path):
        ids = [a["id"] for a in annotations]
        raise RowError(f"image file not found (image_id {image_id}, referenced by annotation id(s) "
                       f"{ids[:10]}{'...' if len(ids) > 10 else ''})")
    with open(path, "rb") as f:
        data = f.read()
    try:
        stored, width, height = probe_image(data, check=check, max_pixels=max_pixels)
    except ImageCheckError as exc:
        raise RowError(f"image_id {image_id}: {exc}") from None
    if declared[0] and declared[1] and (width, height) != declared:
        raise RowError(f"image_id {image_id}: file is {width}x{height} but the JSON says {declared[0]}x{declared[1]}")
    return {"image": stored, "label": -1, "label_name": "", "group": os.path.splitext(os.path.basename(path))[0],
            "split": split, "width": width, "height": height, "image_id": image_id, "annotations": annotations}


def _guess_split(annotations: Path) -> str:
    name = annotations.name.lower()
    for split in ("train", "val", "test"):
        if re.search(rf"(^|[_\-.]){split}", name):
            return split
    return "train"


def convert_coco(
    images: str | os.PathLike,
    annotations: str | os.PathLike,
    out: str,
    options: ConvertOptions,
    split: Optional[str] = None,
    check: str = "fast",
) -> Manifest:
    """COCO images + instances JSON -> dataset (see the module docstring)."""
    images_dir = Path(images)
    ann_path = Path(annotations)
    if not images_dir.is_dir():
        raise DataError(f"{images}: --images is not a directory")
    coco = load_coco_json(ann_path)
    split = split or _guess_split(ann_path)
    skipped: list[dict] = []
    # annotations that point to an image id the JSON does not list
    for ann in coco.dataset["annotations"]:
        if ann["image_id"] not in coco.imgs:
            msg = f"{ann_path}: annotation id {ann['id']} points to image_id {ann['image_id']}, which is not in 'images'"
            if options.on_error == "fail":
                raise DataError(msg)
            skipped.append({"input": f"{ann_path}#annotation={ann['id']}", "reason": msg})
    tasks, listing = [], []
    for image_id in sorted(coco.imgs):
        info = coco.imgs[image_id]
        where = f"{ann_path}: image_id {image_id}"
        anns = []
        try:
            h, w = int(info.get("height", 0)), int(info.get("width", 0))
            for a in sorted(coco.imgToAnns.get(image_id, []), key=lambda a: a["id"]):
                anns.append(annotation_to_row(a, h, w, f"{where} annotation id {a['id']}"))
        except (RowError, TypeError, ValueError, KeyError, IndexError) as exc:
            reason = str(exc) if isinstance(exc, RowError) else f"{where}: malformed annotation ({describe_error(exc)})"
            if options.on_error == "fail":
                raise DataError(reason) from None
            skipped.append({"input": where, "reason": reason})
            continue
        file_name = str(info["file_name"])
        path = images_dir / file_name
        if not path.resolve().is_relative_to(images_dir.resolve()):  # a file name is never trusted as a path
            raise DataError(f"{where}: file_name {file_name!r} points outside --images {images_dir}")
        size = path.stat().st_size if path.is_file() else -1
        listing.append((file_name, size, image_id, anns))
        tasks.append(Task(sample_id=f"{image_id:012d}", source=f"{path} (image_id {image_id})",
                          loader=load_coco_image, args=(str(path), image_id, anns, split, (w, h), check,
                                                          options.max_pixels)))
    categories = sorted(({"id": int(c["id"]), "name": str(c.get("name", c["id"])),
                          "supercategory": str(c.get("supercategory", ""))} for c in coco.dataset["categories"]),
                        key=lambda c: c["id"])
    params = {"split": split, "check": check, "shard_mb": options.shard_mb}
    return write_dataset(
        out, tasks, converter="coco", params=params,
        source_fingerprint=fingerprint("coco", params, [categories] + listing),
        label_names=[], options=options, schema=COCO_SCHEMA, kind="coco", skipped=skipped,
        extra={"categories": categories, "annotations_file": ann_path.name,
               "label": "none (-1): object categories are in annotations[].category_id"},
    )
