"""COCO box AP with pycocotools, with the size ranges set for 128-pixel canvases.

COCO files an object as small below 32^2 px^2 and large above 96^2, for images of about
640 px. On a 128-px canvas those ranges would call almost every digit small.
The ranges here sit between the demo's digit scale bands, on the box area (w * h):
small < 14^2, medium 14^2 .. 28^2, large > 28^2. These cut-offs misfile the fewest digits
of their band (about 3.6% at 14^2, 2.4% at 28^2, mostly thin "1"s filed one range down).
``maxDets`` is COCO's (1, 10, 100); AP is averaged over IoU 0.50:0.95 as in COCO.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from .data import DetectionSplit, iterate_batches

__all__ = ["AREA_RANGES", "METRICS", "coco_ground_truth", "predict", "coco_metrics", "evaluate"]

AREA_RANGES: dict[str, tuple[float, float]] = {
    "all": (0.0, 1e10),
    "small": (0.0, 14.0**2),
    "medium": (14.0**2, 28.0**2),
    "large": (28.0**2, 1e10),
}
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def _xywh(box: Sequence[float]) -> list[float]:
    x1, y1, x2, y2 = (float(v) for v in box)
    return [x1, y1, x2 - x1, y2 - y1]


def coco_ground_truth(boxes: Sequence[Tensor], labels: Sequence[Tensor], canvas: int) -> dict:
    """A COCO-format dataset: image ids 0..M-1, annotation ids from 1, category ids label + 1, area w*h."""
    images = [{"id": i, "width": canvas, "height": canvas} for i in range(len(boxes))]
    anns = []
    for i, (b, lab) in enumerate(zip(boxes, labels)):
        for box, label in zip(b.tolist(), lab.tolist()):
            xywh = _xywh(box)
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": i,
                    "category_id": int(label) + 1,
                    "bbox": xywh,
                    "area": xywh[2] * xywh[3],
                    "iscrowd": 0,
                }
            )
    cats = [{"id": k + 1, "name": str(k)} for k in range(10)]
    return {"images": images, "annotations": anns, "categories": cats}


@torch.no_grad()
def predict(model: nn.Module, split: DetectionSplit, batch_size: int = 50, device: str = "cpu") -> list[dict]:
    """COCO-format detections of ``model`` (switched to eval mode) on every canvas of ``split``."""
    was_training = model.training
    model.eval()
    dets: list[dict] = []
    try:
        for idx, images, _ in iterate_batches(split, batch_size, device):
            for i, out in zip(idx, model(images)):
                for box, score, label in zip(out["boxes"].tolist(), out["scores"].tolist(), out["labels"].tolist()):
                    dets.append({"image_id": i, "category_id": int(label) + 1, "bbox": _xywh(box), "score": score})
    finally:
        model.train(was_training)
    return dets


def coco_metrics(gt: dict, detections: list[dict]) -> dict[str, float]:
    """AP, AP50, AP75, APs, APm, APl in percent (COCOeval, the ranges of `AREA_RANGES`).

    No detections at all gives 0 for every metric (COCO's ``loadRes`` cannot take an empty
    list); a size range with no ground truth gives NaN (COCOeval's -1).
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if not detections:
        return dict.fromkeys(METRICS, 0.0)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = {k: list(v) for k, v in gt.items()}
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes([dict(d) for d in detections])
        ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
        ev.params.areaRng = [list(AREA_RANGES[k]) for k in ("all", "small", "medium", "large")]
        ev.params.areaRngLbl = ["all", "small", "medium", "large"]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = ev.stats  # AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ARs, ARm, ARl
    return {name: (float("nan") if stats[i] < 0 else 100.0 * float(stats[i])) for i, name in enumerate(METRICS)}


def evaluate(model: nn.Module, split: DetectionSplit, canvas: int, device: str = "cpu") -> dict[str, float]:
    """COCO metrics of ``model`` on ``split`` (percent)."""
    gt = coco_ground_truth(split.boxes, split.labels, canvas)
    return coco_metrics(gt, predict(model, split, device=device))


def finite_metrics(metrics: dict[str, float]) -> bool:
    return all(math.isfinite(v) for v in metrics.values())


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0
