"""One batched ultralytics call per request, keeping what uncertainty needs and ultralytics drops.

Ultralytics' Results keep only each box's top class. Uncertainty needs the whole class distribution, which
exists only in the detection head's output before NMS. The predictors below run ultralytics' own NMS with
``return_idxs=True`` and pick the kept candidates' class scores out of the raw head output.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from ultralytics.engine.results import Results
from ultralytics.models.yolo.detect import DetectionPredictor
from ultralytics.models.yolo.segment import SegmentationPredictor
from ultralytics.utils import nms, ops


@dataclass
class Detections:
    """Everything the model said about one image, down to the low (uncertainty) confidence threshold."""

    width: int
    height: int
    boxes: np.ndarray  # (n, 4) xyxy in pixels of the original image
    confidences: np.ndarray  # (n,)
    classes: np.ndarray  # (n,) int
    class_scores: np.ndarray | None  # (n, k) per-class scores before NMS; None for end-to-end heads
    polygons: list[np.ndarray] | None = None  # segment: (m, 2) pixel points per region
    probs: np.ndarray | None = None  # classify: (k,) class probabilities
    embedding: np.ndarray | None = None  # (d,) pooled backbone features, when asked for


class _ClassScores:
    """Mixin: NMS that also returns, for each kept box, its full row of class scores."""

    def _nms_with_scores(self, raw: torch.Tensor, img, orig_imgs, **kwargs) -> list[Results]:
        nc = len(self.model.names)
        kept, idxs = nms.non_max_suppression(
            raw,
            self.args.conf,
            self.args.iou,
            self.args.classes,
            self.args.agnostic_nms,
            max_det=self.args.max_det,
            nc=nc,
            end2end=getattr(self.model, "end2end", False),
            return_idxs=True,
        )
        if not isinstance(orig_imgs, list):
            orig_imgs = ops.convert_torch2numpy_batch(orig_imgs)[..., ::-1]
        results = self.construct_results(kept, img, orig_imgs, **kwargs)
        end2end = raw.shape[-1] == 6 or getattr(self.model, "end2end", False)
        for r, head, idx in zip(results, raw, idxs, strict=True):
            # head: (4 + nc + extra, candidates); idx: kept candidate indices.
            r.class_scores = (
                None if end2end else head[4 : 4 + nc, idx.long().view(-1)].T.float().cpu().numpy()
            )
        return results


class ScoringDetectionPredictor(_ClassScores, DetectionPredictor):
    def postprocess(self, preds, img, orig_imgs, **kwargs):
        raw = preds[0] if isinstance(preds, (list, tuple)) else preds
        return self._nms_with_scores(raw, img, orig_imgs, **kwargs)


class ScoringSegmentationPredictor(_ClassScores, SegmentationPredictor):
    def postprocess(self, preds, img, orig_imgs, **kwargs):
        protos = preds[0][1] if isinstance(preds[0], tuple) else preds[1]
        raw = preds[0][0] if isinstance(preds[0], tuple) else preds[0]
        return self._nms_with_scores(raw, img, orig_imgs, protos=protos)


PREDICTORS = {"detect": ScoringDetectionPredictor, "segment": ScoringSegmentationPredictor}


def to_detections(r: Results) -> Detections:
    h, w = r.orig_shape
    if r.probs is not None:
        empty = np.zeros((0,), dtype=np.float32)
        return Detections(
            w,
            h,
            np.zeros((0, 4), np.float32),
            empty,
            empty.astype(int),
            None,
            probs=r.probs.data.float().cpu().numpy(),
        )
    boxes = r.boxes
    polygons = [np.asarray(p, dtype=np.float32) for p in r.masks.xy] if r.masks is not None else None
    return Detections(
        width=w,
        height=h,
        boxes=boxes.xyxy.float().cpu().numpy(),
        confidences=boxes.conf.float().cpu().numpy(),
        classes=boxes.cls.cpu().numpy().astype(int),
        class_scores=getattr(r, "class_scores", None),
        polygons=polygons,
    )


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    return device
