"""COCO-form shards -> Mask R-CNN inputs (DESIGN.md section 4: rows with ``image_id`` and an ``annotations`` list).

- `detection_categories(manifest, class_agnostic)`: the label map. Class-agnostic (default): every category is
  foreground label 1 ("nucleus"/"object"); otherwise category i of ``manifest.extra["categories"]`` (sorted by id)
  is label i + 1. Label 0 is background (torchvision's convention).
- `annotations_to_target(anns, height, width, labels)`: polygons (`pycocotools.mask.frPyObjects`) and compressed RLE
  -> binary masks (N, H, W) uint8, boxes [x0, y0, x1, y1] from the COCO bbox, labels. Crowd annotations and boxes
  under one pixel are dropped (torchvision's references do the same for training); an image with no annotations
  stays as a negative (empty targets).
- `DetectionDataset(uri, split, transform)`: map-style dataset over the rows of one split, in dataset order. The
  annotation index (no image bytes) is read once; an item's image is read on demand from its row group, so memory
  is the index plus one shard's encoded images.
- `detection_train_transform(aug)`: torchvision.transforms.v2 on tv_tensors (image, boxes, masks move together):
  horizontal / vertical flips and a random multiple of 90 degrees (histology has no "up"), then float [0, 1].
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import DataError
from .images import decode_array
from .shards import Manifest, read_manifest, read_table

__all__ = ["detection_categories", "annotations_to_target", "DetectionDataset", "detection_train_transform",
           "detection_eval_transform", "collate_detection", "RandomRotate90"]

log = logging.getLogger(__name__)

INDEX_COLUMNS = ["sample_id", "split", "image_id", "width", "height", "annotations"]


def detection_categories(manifest: Manifest, class_agnostic: bool = True) -> tuple[dict[int, int], list[str]]:
    """({category_id: label}, label names with index 0 = background)."""
    if manifest.kind != "coco":
        raise DataError(f"{manifest.uri}: detection needs a COCO-form dataset (kind 'coco', an annotations "
                        f"column); this one is kind {manifest.kind!r}")
    cats = sorted(manifest.extra.get("categories") or [], key=lambda c: int(c["id"]))
    if class_agnostic or not cats:
        supers = {str(c.get("supercategory") or "") for c in cats}
        name = supers.pop() if len(supers) == 1 and "" not in supers else "object"
        return {int(c["id"]): 1 for c in cats}, ["background", name]
    return {int(c["id"]): i + 1 for i, c in enumerate(cats)}, ["background"] + [str(c["name"]) for c in cats]


def annotations_to_target(anns: Optional[list[dict]], height: int, width: int, labels: dict[int, int],
                          class_agnostic: bool = True, where: str = "") -> dict[str, torch.Tensor]:
    """Shard annotations of one image -> {"boxes" (N,4) float32 xyxy, "labels" (N,) int64, "masks" (N,H,W) uint8}."""
    from pycocotools import mask as mask_utils

    boxes, classes, masks = [], [], []
    for ann in anns or []:
        if ann.get("iscrowd"):
            continue
        x, y, w, h = (float(v) for v in ann["bbox"])
        if w < 1 or h < 1:
            continue
        cat = int(ann["category_id"])
        if cat not in labels:
            if not class_agnostic:
                raise DataError(f"{where}: annotation id {ann['id']} has category_id {cat}, which the manifest's "
                                f"categories do not list")
            label = 1
        else:
            label = labels[cat]
        if ann.get("segmentation_rle"):
            rle = ann["segmentation_rle"]
            if [int(v) for v in rle["size"]] != [height, width]:
                raise DataError(f"{where}: annotation id {ann['id']} RLE size {rle['size']} != image {height}x{width}")
            m = mask_utils.decode({"size": list(rle["size"]), "counts": rle["counts"].encode("ascii")})
        elif ann.get("segmentation_polygons"):
            polys = [p for p in ann["segmentation_polygons"] if len(p) >= 6]
            if not polys:
                continue
            m = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polys, height, width)))
        else:  # box-only annotation: the box is the mask
            m = np.zeros((height, width), dtype=np.uint8)
            m[int(y):int(np.ceil(y + h)), int(x):int(np.ceil(x + w))] = 1
        boxes.append([x, y, x + w, y + h])
        classes.append(label)
        masks.append(np.asarray(m, dtype=np.uint8))
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(classes, dtype=torch.int64),
        "masks": torch.from_numpy(np.stack(masks)) if masks else torch.zeros((0, height, width), dtype=torch.uint8),
    }


class RandomRotate90(torch.nn.Module):
    """Rotate image, boxes and masks together by k * 90 degrees, k uniform in {0, 1, 2, 3} (torch RNG)."""

    def forward(self, *inputs: Any) -> Any:
        from torchvision import tv_tensors
        from torchvision.transforms.v2 import functional as F

        k = int(torch.randint(4, (1,)))
        if k == 0:
            return inputs if len(inputs) > 1 else inputs[0]
        from torch.utils._pytree import tree_map

        def rotate(x):
            # only tv_tensors move (image, boxes, masks); labels and ids pass through
            return F.rotate(x, 90.0 * k, expand=True) if isinstance(x, tv_tensors.TVTensor) else x

        out = tree_map(rotate, inputs)
        return out if len(inputs) > 1 else out[0]


def detection_train_transform(hflip: float = 0.5, vflip: float = 0.5, rotate90: bool = True) -> Callable:
    from torchvision.transforms import v2

    steps: list = []
    if hflip > 0:
        steps.append(v2.RandomHorizontalFlip(hflip))
    if vflip > 0:
        steps.append(v2.RandomVerticalFlip(vflip))
    if rotate90:
        steps.append(RandomRotate90())
    steps += [v2.ToDtype(torch.float32, scale=True), v2.SanitizeBoundingBoxes(min_size=1.0)]
    return v2.Compose(steps)


def detection_eval_transform() -> Callable:
    from torchvision.transforms import v2

    return v2.ToDtype(torch.float32, scale=True)


class DetectionDataset(Dataset):
    """(image float (3,H,W) in [0, 1], target) for every row of `split`; target adds "image_id" and "sample_id"."""

    def __init__(self, uri: str, split: Optional[str], transform: Optional[Callable] = None,
                 class_agnostic: bool = True, manifest: Optional[Manifest] = None) -> None:
        self.uri = str(uri).rstrip("/")
        self.manifest = manifest or read_manifest(self.uri)
        self.labels, self.label_names = detection_categories(self.manifest, class_agnostic)
        self.class_agnostic = class_agnostic
        table = read_table(self.uri, columns=INDEX_COLUMNS, manifest=self.manifest)
        splits = table.column("split").to_pylist()
        self.rows = [i for i, s in enumerate(splits) if split is None or s == split]
        cols = {c: table.column(c).to_pylist() for c in ("sample_id", "image_id", "width", "height")}
        anns = table.column("annotations").to_pylist()
        self.records = [{"row": i, "sample_id": cols["sample_id"][i], "image_id": int(cols["image_id"][i]),
                         "width": int(cols["width"][i]), "height": int(cols["height"][i]), "annotations": anns[i] or []}
                        for i in self.rows]
        self.transform = transform or detection_eval_transform()
        self._shard_images = None  # (shard index, image column): memory = one shard's encoded images

    def __len__(self) -> int:
        return len(self.records)

    def read_image(self, index: int) -> np.ndarray:
        """RGB pixels of item `index`; the image column of one shard is kept (items of a shard are read together)."""
        import bisect

        rec = self.records[index]
        offsets = self.manifest.shard_offsets()
        shard = bisect.bisect_right(offsets, rec["row"]) - 1
        if self._shard_images is None or self._shard_images[0] != shard:
            table = read_table(self.uri, columns=["image"], shards=[shard], manifest=self.manifest)
            self._shard_images = (shard, table.column("image"))
        pixels = decode_array(self._shard_images[1][rec["row"] - offsets[shard]].as_py())
        if pixels.ndim == 2:
            pixels = np.repeat(pixels[:, :, None], 3, axis=2)
        return pixels[:, :, :3]

    def target(self, index: int) -> dict[str, torch.Tensor]:
        rec = self.records[index]
        return annotations_to_target(rec["annotations"], rec["height"], rec["width"], self.labels,
                                     self.class_agnostic, where=f"{self.uri} sample_id {rec['sample_id']!r}")

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        from torchvision import tv_tensors

        rec = self.records[index]
        pixels = self.read_image(index)
        if pixels.shape[:2] != (rec["height"], rec["width"]):
            raise DataError(f"{self.uri}: sample_id {rec['sample_id']!r} image is {pixels.shape[1]}x{pixels.shape[0]}, "
                            f"the row says {rec['width']}x{rec['height']}")
        t = self.target(index)
        h, w = pixels.shape[:2]
        image = tv_tensors.Image(torch.from_numpy(np.array(pixels)).permute(2, 0, 1))
        target = {"boxes": tv_tensors.BoundingBoxes(t["boxes"], format="XYXY", canvas_size=(h, w)),
                  "masks": tv_tensors.Mask(t["masks"]), "labels": t["labels"]}
        image, target = self.transform(image, target)
        target = {"boxes": target["boxes"].as_subclass(torch.Tensor), "labels": target["labels"],
                  "masks": target["masks"].as_subclass(torch.Tensor), "image_id": rec["image_id"],
                  "sample_id": rec["sample_id"]}
        return image.as_subclass(torch.Tensor), target


def collate_detection(batch: list) -> tuple[list[torch.Tensor], list[dict]]:
    return [b[0] for b in batch], [b[1] for b in batch]
