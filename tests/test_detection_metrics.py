"""COCO evaluation of detections (lgff_core.evaluate.detection_metrics) and the COCO-form shard reader (data.detection)."""
import numpy as np
import pytest
import torch

from lgff_core.data.detection import DetectionDataset, annotations_to_target, detection_train_transform
from lgff_core.evaluate.detection_metrics import (coco_from_dicts, coco_metrics, ground_truth_coco, outputs_from_targets,
                                         predictions_to_results)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools' np.array(copy=False)


def test_ground_truth_as_predictions_scores_one(nuclei):
    ds = DetectionDataset(nuclei, split="test")
    targets = [ds.target(i) for i in range(len(ds))]
    n = sum(len(t["labels"]) for t in targets)
    assert len(ds) == 4 and n > 200 and max(len(t["labels"]) for t in targets) > 100  # dense: > 100 per tile
    gt = ground_truth_coco(ds)
    results = predictions_to_results(outputs_from_targets(targets), [r["image_id"] for r in ds.records])
    for iou_type in ("bbox", "segm"):
        m = coco_metrics(gt, results, iou_type, max_dets=1000)
        assert m["AP"] == pytest.approx(1.0) and m["AP50"] == pytest.approx(1.0) and m["AR"] == pytest.approx(1.0)
        # COCOeval's own stats assume 100 detections: capped at 100 per image the same predictions lose recall
        assert coco_metrics(gt, results, iou_type, max_dets=100)["AR"] < 0.9


def _square(x, y, s, size=64):
    m = np.zeros((size, size), dtype=np.uint8)
    m[y:y + s, x:x + s] = 1
    return m


def test_one_shifted_box_gives_the_hand_computed_ap():
    from pycocotools import mask as mask_utils

    # two 20x20 ground-truth boxes in one image; predictions: one exact (score 0.9), one shifted by 5 px in x
    # (score 0.8): IoU = 15*20 / (2*400 - 300) = 0.6. At IoU thresholds 0.50, 0.55, 0.60 both match -> AP 1.0;
    # at 0.65 .. 0.95 (7 thresholds) only the higher-scored one matches: precision 1 up to recall 0.5, then 0 ->
    # interpolated AP = 51/101 (recall points 0.00 .. 0.50 of COCO's 101). AP = (3 * 1 + 7 * 51/101) / 10.
    gt_boxes = [(4, 4), (36, 30)]
    anns = []
    for i, (x, y) in enumerate(gt_boxes):
        rle = mask_utils.encode(np.asfortranarray(_square(x, y, 20)))
        anns.append({"id": i + 1, "image_id": 1, "category_id": 1, "bbox": [x, y, 20, 20], "area": 400.0,
                     "iscrowd": 0, "segmentation": {"size": [64, 64], "counts": rle["counts"].decode()}})
    gt = coco_from_dicts([{"id": 1, "width": 64, "height": 64}], anns, [{"id": 1, "name": "nucleus"}])
    masks = torch.stack([torch.from_numpy(_square(4, 4, 20)), torch.from_numpy(_square(41, 30, 20))])
    out = {"boxes": torch.tensor([[4.0, 4, 24, 24], [41.0, 30, 61, 50]]), "labels": torch.tensor([1, 1]),
           "scores": torch.tensor([0.9, 0.8]), "masks": masks[:, None].float()}
    results = predictions_to_results([out], [1])
    expected = (3 * 1.0 + 7 * 51 / 101) / 10
    for iou_type in ("bbox", "segm"):
        m = coco_metrics(gt, results, iou_type)
        assert m["AP"] == pytest.approx(expected, abs=1e-9)
        assert m["AP50"] == pytest.approx(1.0) and m["AP75"] == pytest.approx(51 / 101)
        assert m["AR"] == pytest.approx((3 * 1.0 + 7 * 0.5) / 10)
        assert m["APs"] == pytest.approx(expected) and m["APm"] is None and m["APl"] is None  # area 400 < 32^2


def test_targets_from_polygons_rle_and_negatives():
    poly = {"id": 7, "category_id": 3, "bbox": [2.0, 2.0, 4.0, 4.0], "area": 16.0, "iscrowd": 0,
            "segmentation_polygons": [[2.0, 2.0, 6.0, 2.0, 6.0, 6.0, 2.0, 6.0]], "segmentation_rle": None}
    crowd = dict(poly, id=8, iscrowd=1)
    t = annotations_to_target([poly, crowd], 10, 12, {3: 1})
    assert t["boxes"].tolist() == [[2.0, 2.0, 6.0, 6.0]] and t["labels"].tolist() == [1]
    assert t["masks"].shape == (1, 10, 12) and t["masks"][0, 2:6, 2:6].all() and t["masks"].sum() == 16
    empty = annotations_to_target([], 10, 12, {3: 1})
    assert empty["boxes"].shape == (0, 4) and empty["masks"].shape == (0, 10, 12)


def test_train_augmentation_moves_boxes_and_masks_together(nuclei):
    ds = DetectionDataset(nuclei, split="train", transform=detection_train_transform(0.5, 0.5, True))
    for seed in range(4):
        torch.manual_seed(seed)
        image, target = ds[0]
        assert image.dtype == torch.float32 and image.shape[0] == 3 and 0 <= image.min() and image.max() <= 1
        assert len(target["boxes"]) == len(target["masks"]) == len(target["labels"]) > 50
        # every box is the tight box of its mask after flips / rotations (COCO boxes are pixel-edge aligned)
        for box, mask in list(zip(target["boxes"], target["masks"]))[:20]:
            ys, xs = torch.nonzero(mask, as_tuple=True)
            tight = [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]
            assert box.tolist() == pytest.approx(tight, abs=1e-4)
