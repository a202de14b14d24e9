"""Object detection: mAP, VOCmAP and COCOmAP through pycocotools' COCOeval.

Per image, ``preds`` holds (boxes [N, 4] as x1, y1, x2, y2; scores [N]; classes [N]) and
``labels`` holds (boxes [M, 4]; classes [M]). A batch is a list of those. The state is the list
of detections and ground truths (no counts summarise AP), merged by concatenation.
``COCOmAP`` is COCO's AP averaged over IoU 0.50:0.95; ``mAP`` and ``VOCmAP`` are the AP at IoU
0.50 (COCO's 101-point interpolation, not VOC2007's 11 points).
"""

from __future__ import annotations

import contextlib
import io
from typing import Any, Optional, Sequence

import numpy as np

from ..errors import ConfigError, EvaluationError, MissingFrameworkError
from .base import Metric


# LPOT's names (TensorFlow object detection's) for COCOeval's summary figures, by index.
MAP_KEYS = ("DetectionBoxes_Precision/mAP", "DetectionBoxes_Precision/mAP@.50IOU", "DetectionBoxes_Precision/mAP@.75IOU",
            "DetectionBoxes_Precision/mAP (small)", "DetectionBoxes_Precision/mAP (medium)",
            "DetectionBoxes_Precision/mAP (large)", "DetectionBoxes_Recall/AR@1", "DetectionBoxes_Recall/AR@10",
            "DetectionBoxes_Recall/AR@100", "DetectionBoxes_Recall/AR@100 (small)",
            "DetectionBoxes_Recall/AR@100 (medium)", "DetectionBoxes_Recall/AR@100 (large)")


class _COCOMetric(Metric):
    STAT = 0  # index into COCOeval.stats

    def __init__(self, map_key: Optional[str] = None) -> None:
        """``map_key`` picks the reported figure by LPOT's name."""
        if map_key is not None:
            if map_key not in MAP_KEYS:
                raise ConfigError(f"`evaluation.accuracy.metric.{type(self).__name__}.map_key`: {map_key!r} must be one "
                                  f"of {', '.join(MAP_KEYS)}")
            self.STAT = MAP_KEYS.index(map_key)
        self.reset()

    def reset(self) -> None:
        self.images: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []

    def update(self, preds: Sequence[Any], labels: Sequence[Any]) -> None:
        if len(preds) != len(labels):
            raise EvaluationError(f"{type(self).__name__}: detections for {len(preds)} images, ground truth for {len(labels)}")
        for (boxes, scores, classes), (true_boxes, true_classes) in zip(preds, labels, strict=True):
            boxes, true_boxes = np.asarray(boxes, dtype=float).reshape(-1, 4), np.asarray(true_boxes, dtype=float).reshape(-1, 4)
            scores, classes = np.asarray(scores, dtype=float).reshape(-1), np.asarray(classes).reshape(-1)
            true_classes = np.asarray(true_classes).reshape(-1)
            if not len(boxes) == len(scores) == len(classes) or len(true_boxes) != len(true_classes):
                raise EvaluationError(
                    f"{type(self).__name__}: {len(boxes)} boxes, {len(scores)} scores and {len(classes)} classes "
                    f"detected; {len(true_boxes)} boxes and {len(true_classes)} classes in the ground truth"
                )
            self.images.append((boxes, scores, classes, true_boxes, true_classes))

    def merge(self, other: Metric) -> None:
        if not isinstance(other, type(self)):
            raise EvaluationError(f"can't merge {type(other).__name__} into {type(self).__name__}")
        self.images += other.images

    def result(self) -> float:
        if not self.images:
            raise EvaluationError(f"{type(self).__name__}: no images were evaluated (empty evaluation loader?)")
        try:
            from pycocotools.coco import COCO
            from pycocotools.cocoeval import COCOeval
        except ImportError:
            raise MissingFrameworkError("pycocotools (for detection metrics)", "metrics") from None
        truth, detections, categories = [], [], set()
        for image_id, (boxes, scores, classes, true_boxes, true_classes) in enumerate(self.images):
            for box, category in zip(true_boxes, true_classes, strict=True):
                truth.append({"id": len(truth) + 1, "image_id": image_id, "category_id": int(category), "iscrowd": 0,
                              "bbox": _xywh(box), "area": float((box[2] - box[0]) * (box[3] - box[1]))})
                categories.add(int(category))
            for box, score, category in zip(boxes, scores, classes, strict=True):
                detections.append({"image_id": image_id, "category_id": int(category), "bbox": _xywh(box), "score": float(score)})
                categories.add(int(category))
        if not detections:
            return 0.0
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            ground = COCO()
            ground.dataset = {"images": [{"id": index} for index in range(len(self.images))], "annotations": truth,
                              "categories": [{"id": category} for category in sorted(categories)]}
            ground.createIndex()
            evaluation = COCOeval(ground, ground.loadRes(detections), "bbox")
            evaluation.evaluate()
            evaluation.accumulate()
            evaluation.summarize()
        return float(max(evaluation.stats[self.STAT], 0.0))  # -1 means no ground truth at all


def _xywh(box: np.ndarray) -> list[float]:
    return [float(box[0]), float(box[1]), float(box[2] - box[0]), float(box[3] - box[1])]


class COCOmAP(_COCOMetric):
    STAT = 0


class VOCmAP(_COCOMetric):
    STAT = 1


class mAP(_COCOMetric):  # noqa: N801 (LPOT's name)
    STAT = 1


class COCOmAPv2(COCOmAP):
    """LPOT's COCOmAPv2: COCOmAP of a model that outputs batched arrays in its own order
    (an exported detector's boxes [B, N, 4], scores [B, N], classes [B, N] and, where it has
    one, a detection count [B]), picked out by ``output_index_mapping``."""

    MAPPING = {"num_detections": -1, "boxes": 0, "scores": 1, "classes": 2}  # LPOT's default; -1: no such output
    reads_every_output = True

    def __init__(self, map_key: Optional[str] = None, output_index_mapping: Optional[dict] = None) -> None:
        where = "`evaluation.accuracy.metric.COCOmAPv2.output_index_mapping`"
        unknown = set(output_index_mapping or {}) - set(self.MAPPING)
        if unknown:
            raise ConfigError(f"{where}: unknown output(s) {', '.join(sorted(unknown))}; known: {', '.join(self.MAPPING)}")
        self.mapping = {**self.MAPPING, **(output_index_mapping or {})}
        if not all(isinstance(index, int) and not isinstance(index, bool) and index >= -1 for index in self.mapping.values()) \
                or min(self.mapping["boxes"], self.mapping["scores"], self.mapping["classes"]) < 0:
            raise ConfigError(f"{where}: {self.mapping} must give each of boxes, scores and classes the index of a "
                              "model output (0, 1, ...); num_detections may be -1 (none)")
        super().__init__(map_key)

    def update(self, preds: Sequence[Any], labels: Sequence[Any]) -> None:
        if not isinstance(preds, (list, tuple)):
            raise EvaluationError("COCOmAPv2: expected the model's outputs (a list of arrays), got one "
                                  f"{type(preds).__name__}")
        outputs = list(preds)
        needed = max(self.mapping.values())
        if len(outputs) <= needed:
            raise EvaluationError(f"COCOmAPv2: the model gives {len(outputs)} outputs; output_index_mapping "
                                  f"{self.mapping} needs at least {needed + 1}")
        boxes, scores, classes = (np.asarray(outputs[self.mapping[name]]) for name in ("boxes", "scores", "classes"))
        counts = self.mapping["num_detections"]
        kept = np.asarray(outputs[counts]).reshape(-1).astype(int) if counts >= 0 else [len(image) for image in boxes]
        images = [(boxes[image][:kept[image]], scores[image][:kept[image]], classes[image][:kept[image]])
                  for image in range(len(boxes))]
        super().update(images, labels)
