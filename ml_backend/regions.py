"""Model output -> Label Studio result regions, in Label Studio's percent-of-image coordinates."""

from __future__ import annotations

import uuid
from typing import Any

import numpy as np

from ml_backend.inference import Detections
from ml_backend.label_config import OutputSpec


def _pct(v: float, size: int) -> float:
    return float(np.clip(v / size * 100.0, 0.0, 100.0))


def _region(
    spec: OutputSpec, det: Detections, kind: str, value: dict[str, Any], score: float
) -> dict[str, Any]:
    c = spec.control
    return {
        "id": uuid.uuid4().hex[:10],
        "from_name": c.from_name,
        "to_name": c.to_name,
        "type": kind,
        "original_width": det.width,
        "original_height": det.height,
        "image_rotation": 0,
        "value": value,
        "score": round(float(score), 4),
    }


def to_results(det: Detections, spec: OutputSpec, min_conf: float) -> list[dict[str, Any]]:
    """Pre-label regions at or above ``min_conf`` whose class maps to a config label; others are dropped."""
    labels = spec.label_of
    tag = spec.control.tag
    if det.probs is not None:  # classification: one choice for the image
        top = int(np.argmax(det.probs))
        p = float(det.probs[top])
        if top not in labels or p < min_conf:
            return []
        return [_region(spec, det, "choices", {"choices": [labels[top]]}, p)]

    out = []
    for i in range(len(det.confidences)):
        conf, cls = float(det.confidences[i]), int(det.classes[i])
        if conf < min_conf or cls not in labels:
            continue
        if tag == "PolygonLabels" and det.polygons is not None:
            pts = det.polygons[i]
            if len(pts) < 3:
                continue
            points = [[_pct(x, det.width), _pct(y, det.height)] for x, y in pts]
            out.append(
                _region(spec, det, "polygonlabels", {"points": points, "polygonlabels": [labels[cls]]}, conf)
            )
        else:
            x0, y0, x1, y1 = (float(v) for v in det.boxes[i])
            x, y = _pct(x0, det.width), _pct(y0, det.height)
            w, h = _pct(x1, det.width) - x, _pct(y1, det.height) - y
            if w <= 0 or h <= 0:
                continue
            value = {"x": x, "y": y, "width": w, "height": h, "rotation": 0, "rectanglelabels": [labels[cls]]}
            out.append(_region(spec, det, "rectanglelabels", value, conf))
    return out
