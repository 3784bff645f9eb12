"""`lgff evaluate detection`: run a trained LGFFDM over one split of a COCO-form dataset and score it with COCOeval.

Writes under `out` (metrics.json last, so a directory with metrics.json is complete):
    predictions.json   COCO results format (bbox [x, y, w, h], score, category_id, RLE segmentation)
    overlays/*.png     the first `evaluate.det_report_images` images with predicted masks (score >= det_draw_score)
    (the CLI then adds report.md / report.html: `report_detection.write_single_report`)
    metrics.json       {"kind": "detection", "model", "neck", "params": {neck, stem, neck+stem}, "max_dets",
                        "bbox": {AP, AP50, AP75, APs, APm, APl, AR}, "segm": {...}, "per_image": [...]}
"""
from __future__ import annotations

import io
import json
import logging
import time
from typing import Optional

import numpy as np
import torch

from .. import storage
from .detection_metrics import coco_metrics, ground_truth_coco, predictions_to_results

__all__ = ["evaluate_detection", "predict", "draw_overlay"]

log = logging.getLogger(__name__)


@torch.no_grad()
def predict(model, dataset, device: torch.device, batch_size: int = 2, progress: bool = False) -> list[dict]:
    """Model outputs (on CPU) for every item of `dataset`, in order."""
    from tqdm.auto import tqdm

    model.eval()
    outputs = []
    bar = tqdm(total=len(dataset), disable=not progress, leave=False, desc="predict", unit="img")
    for b0 in range(0, len(dataset), batch_size):
        images = [dataset[i][0].to(device) for i in range(b0, min(b0 + batch_size, len(dataset)))]
        for out in model(images):
            outputs.append({k: v.cpu() for k, v in out.items()})
        bar.update(len(images))
    bar.close()
    return outputs


def draw_overlay(pixels: np.ndarray, output: dict, score: float, title: str = "") -> bytes:
    """PNG of `pixels` with the predicted masks (score >= `score`) as coloured contours (matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keep = output["scores"] >= score
    masks = output["masks"][keep][:, 0].numpy() > 0.5 if "masks" in output else np.zeros((0,) + pixels.shape[:2])
    # the title holds a sample id: drawn as written, never parsed as math ('$' in a name)
    with matplotlib.rc_context({"text.parse_math": False}):
        fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
        ax.imshow(pixels)
        rng = np.random.default_rng(0)
        for m in masks:
            if m.any():
                ax.contour(m.astype(float), levels=[0.5], colors=[rng.uniform(0.2, 1.0, 3)], linewidths=0.8)
        ax.set_title(title or f"{int(keep.sum())} predictions (score >= {score})", fontsize=9)
        ax.axis("off")
        buf = io.BytesIO()
        fig.savefig(buf, format="png", bbox_inches="tight")
        plt.close(fig)
    return buf.getvalue()


def evaluate_detection(model_uri: str, data_uri: str, out_uri: str, cfg, split: Optional[str] = None,
                       max_dets: Optional[int] = None, device: str = "auto", label: Optional[str] = None,
                       progress: bool = False) -> dict:
    """Predict, score (bbox + segm) and write the outputs listed in the module docstring. Returns metrics.json."""
    from ..data.detection import DetectionDataset
    from ..errors import DataError
    from ..models.summary import count_parameters
    from ..train.checkpoint import load_model_from_checkpoint
    from ..device import resolve_device

    dev = resolve_device(device if device != "auto" else cfg.train.device)
    model, meta = load_model_from_checkpoint(model_uri, device=dev)
    mcfg = meta["config"]["model"]
    if mcfg.get("kind") != "detection":
        raise DataError(f"{model_uri}: not a detection model (model.kind={mcfg.get('kind')!r})")
    split = split or cfg.evaluate.det_split
    max_dets = int(max_dets or cfg.evaluate.det_max_dets)
    if max_dets > model.roi_heads.detections_per_img:
        log.warning("--max-dets %d > the model's %d detections per image (model.det_detections_per_img)", max_dets,
                    model.roi_heads.detections_per_img)
    dataset = DetectionDataset(data_uri, split, class_agnostic=mcfg.get("det_class_agnostic", True))
    if len(dataset) == 0:
        raise DataError(f"{data_uri}: no rows in split {split!r} (splits present: "
                        f"{sorted(dataset.manifest.split_counts)})")
    t0 = time.perf_counter()
    outputs = predict(model, dataset, dev, batch_size=max(1, cfg.train.batch_size), progress=progress)
    seconds = time.perf_counter() - t0
    image_ids = [r["image_id"] for r in dataset.records]
    results = predictions_to_results(outputs, image_ids)
    gt = ground_truth_coco(dataset)
    out_uri = str(out_uri).rstrip("/")
    metrics_uri = storage.join(out_uri, "metrics.json")
    if storage.exists(metrics_uri):  # replacing an output: it is incomplete until metrics.json is back
        storage.delete(metrics_uri)
    storage.write_text(storage.join(out_uri, "predictions.json"), json.dumps(results))
    draw = cfg.evaluate.det_draw_score
    per_image = [{"sample_id": r["sample_id"], "image_id": r["image_id"],
                  "gt": sum(1 for a in r["annotations"] if not a.get("iscrowd")),
                  "predicted": int(len(o["scores"])), f"predicted_score>={draw}": int((o["scores"] >= draw).sum())}
                 for r, o in zip(dataset.records, outputs)]
    overlays = []
    for i in range(min(cfg.evaluate.det_report_images, len(dataset))):
        name = f"overlays/{i:02d}.png"
        png = draw_overlay(dataset.read_image(i), outputs[i], draw,
                           f"{dataset.records[i]['sample_id']}: {per_image[i][f'predicted_score>={draw}']} predicted "
                           f"(score >= {draw}), {per_image[i]['gt']} ground truth")
        storage.write_bytes(storage.join(out_uri, name), png)
        overlays.append(name)
    neck = model.backbone
    params = {"neck": count_parameters(neck.neck)["params"], "stem": count_parameters(neck.stem)["params"]}
    params["neck+stem"] = params["neck"] + params["stem"]
    scores = {t: coco_metrics(gt, results, t, max_dets) for t in ("bbox", "segm")}
    result = {
        "kind": "detection", "model": label or meta.get("name") or mcfg.get("neck"), "neck": mcfg.get("neck"),
        "backbone": mcfg.get("backbone", {}).get("name"), "checkpoint": model_uri, "data": data_uri, "split": split,
        "n_images": len(dataset), "n_gt": sum(p["gt"] for p in per_image), "max_dets": max_dets,
        "params": params, "bbox": scores["bbox"], "segm": scores["segm"], "per_image": per_image, "overlays": overlays,
        "predict_s_per_image": seconds / len(dataset),
        "metrics": {f"{t}_{k}": v for t in ("bbox", "segm") for k, v in scores[t].items()}, "train": meta.get("metrics", {}), "epoch": meta.get("epoch"),
    }
    storage.write_text(metrics_uri, json.dumps(result, indent=1, sort_keys=True))
    return result
