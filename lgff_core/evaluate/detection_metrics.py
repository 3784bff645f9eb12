"""COCO detection / instance-segmentation metrics with pycocotools `COCOeval` (DESIGN.md section 5).

- `ground_truth_coco(dataset)`: the ground truth of a `DetectionDataset` as a pycocotools `COCO` (categories = the
  dataset's labels: one "nucleus"/"object" class when class-agnostic; crowd regions kept, as COCO scores them).
- `predictions_to_results(outputs, image_ids)`: Mask R-CNN outputs -> COCO results format (``bbox`` [x, y, w, h],
  ``score``, ``category_id``, ``segmentation`` compressed RLE via `pycocotools.mask.encode` with string counts).
- `coco_metrics(gt, results, iou_type, max_dets)`: runs COCOeval with ``maxDets = [1, 10, max_dets]`` and reads
  AP, AP50, AP75, APs/m/l and AR from ``eval['precision']`` / ``eval['recall']`` at ``max_dets`` (COCOeval's
  ``stats`` hard-code 100 detections, which is wrong for dense nuclei tiles with hundreds of instances).
  A metric with no ground truth in its area range is None (COCO's -1).
"""
from __future__ import annotations

import contextlib
import io
import logging
from typing import Any, Iterable, Optional

import numpy as np
import torch

__all__ = ["ground_truth_coco", "predictions_to_results", "coco_metrics", "METRIC_NAMES", "coco_from_dicts"]

log = logging.getLogger(__name__)

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR")


def coco_from_dicts(images: list[dict], annotations: list[dict], categories: list[dict]):
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = {"images": images, "annotations": annotations, "categories": categories}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def ground_truth_coco(dataset) -> Any:
    """pycocotools COCO of a `DetectionDataset`'s ground truth (category ids = the dataset's labels)."""
    from ..data.converters.coco import row_annotation_to_coco

    images, annotations = [], []
    for rec in dataset.records:
        images.append({"id": rec["image_id"], "width": rec["width"], "height": rec["height"],
                       "file_name": rec["sample_id"]})
        for ann in rec["annotations"]:
            out = row_annotation_to_coco(ann, rec["image_id"])
            out["category_id"] = dataset.labels.get(int(ann["category_id"]), 1)
            if "segmentation" not in out:  # box-only: the box is the mask
                x, y, w, h = out["bbox"]
                out["segmentation"] = [[x, y, x + w, y, x + w, y + h, x, y + h]]
            annotations.append(out)
    categories = [{"id": i, "name": n} for i, n in enumerate(dataset.label_names) if i > 0]
    return coco_from_dicts(images, annotations, categories)


def predictions_to_results(outputs: Iterable[dict], image_ids: Iterable[int], mask_threshold: float = 0.5) -> list[dict]:
    """Mask R-CNN outputs (boxes xyxy, labels, scores, masks (N,1,H,W) probabilities) -> COCO results dicts."""
    from pycocotools import mask as mask_utils

    results = []
    for out, image_id in zip(outputs, image_ids):
        boxes = out["boxes"].detach().float().cpu().numpy()
        scores = out["scores"].detach().float().cpu().numpy()
        labels = out["labels"].detach().cpu().numpy()
        masks = out.get("masks")
        binary = None
        if masks is not None and len(masks):
            binary = (masks.detach().float().cpu()[:, 0] > mask_threshold).numpy().astype(np.uint8)
        for i in range(len(scores)):
            x0, y0, x1, y1 = (float(v) for v in boxes[i])
            res = {"image_id": int(image_id), "category_id": int(labels[i]), "bbox": [x0, y0, x1 - x0, y1 - y0],
                   "score": float(scores[i])}
            if binary is not None:
                rle = mask_utils.encode(np.asfortranarray(binary[i]))
                res["segmentation"] = {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}
            results.append(res)
    return results


def _mean_valid(values: np.ndarray) -> Optional[float]:
    valid = values[values > -1]
    return float(valid.mean()) if valid.size else None


def coco_metrics(gt, results: list[dict], iou_type: str = "bbox", max_dets: int = 100) -> dict[str, Optional[float]]:
    """AP, AP50, AP75, APs, APm, APl, AR at `max_dets` detections per image (see the module docstring)."""
    from pycocotools.cocoeval import COCOeval

    if iou_type not in ("bbox", "segm"):
        raise ValueError(f"iou_type {iou_type!r} is not 'bbox' or 'segm'")
    if not results:  # COCO.loadRes refuses an empty list: nothing detected scores 0 where there is ground truth
        has_gt = len(gt.getAnnIds(iscrowd=False)) > 0
        return {k: (0.0 if has_gt else None) for k in METRIC_NAMES}
    if iou_type == "segm" and any("segmentation" not in r for r in results):
        raise ValueError("segm evaluation needs a 'segmentation' in every result")
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes([dict(r) for r in results])
        ev = COCOeval(gt, dt, iou_type)
        ev.params.maxDets = sorted({1, 10, int(max_dets)})
        ev.evaluate()
        ev.accumulate()
    p = ev.params
    precision = ev.eval["precision"]  # [T iou, R recall, K cat, A area, M maxDets]
    recall = ev.eval["recall"]  # [T, K, A, M]
    m = p.maxDets.index(int(max_dets))
    area = {name: i for i, name in enumerate(p.areaRngLbl)}
    t50 = int(np.argmin(np.abs(p.iouThrs - 0.5)))
    t75 = int(np.argmin(np.abs(p.iouThrs - 0.75)))
    return {
        "AP": _mean_valid(precision[:, :, :, area["all"], m]),
        "AP50": _mean_valid(precision[t50, :, :, area["all"], m]),
        "AP75": _mean_valid(precision[t75, :, :, area["all"], m]),
        "APs": _mean_valid(precision[:, :, :, area["small"], m]),
        "APm": _mean_valid(precision[:, :, :, area["medium"], m]),
        "APl": _mean_valid(precision[:, :, :, area["large"], m]),
        "AR": _mean_valid(recall[:, :, area["all"], m]),
    }


def outputs_from_targets(targets: list[dict], score: float = 1.0) -> list[dict]:
    """Ground-truth targets dressed as model outputs (all scores `score`): the upper bound, for tests and checks."""
    return [{"boxes": t["boxes"], "labels": t["labels"], "scores": torch.full((len(t["labels"]),), float(score)),
             "masks": t["masks"][:, None].float()} for t in targets]
