"""Model output -> Label Studio regions: percent coordinates, thresholds and mapping."""

from __future__ import annotations

import numpy as np
import pytest

from ml_backend.inference import Detections
from ml_backend.label_config import parse_label_config, select_output
from ml_backend.regions import to_results

NAMES = {0: "circle", 1: "square"}


def spec(tag: str, labels: str = '<Label value="Circle"/>'):
    controls = parse_label_config(
        f'<View><Image name="im" value="$image"/><{tag} name="ctl" toName="im">{labels}</{tag}></View>'
    )
    task = {"RectangleLabels": "detect", "PolygonLabels": "segment", "Choices": "classify"}[tag]
    return select_output(controls, task, NAMES)


def det(**kw) -> Detections:
    base = dict(
        width=200,
        height=100,
        boxes=np.array([[20.0, 10.0, 120.0, 60.0], [0, 0, 10, 10]]),
        confidences=np.array([0.9, 0.1]),
        classes=np.array([0, 0]),
        class_scores=None,
    )
    base.update(kw)
    return Detections(**base)


def test_boxes_become_percent_regions_above_the_threshold():
    (r,) = to_results(det(), spec("RectangleLabels"), min_conf=0.25)
    # x = 20/200 = 10 %, y = 10/100 = 10 %, width = 100/200 = 50 %, height = 50/100 = 50 %
    assert r["value"] == {
        "x": 10.0,
        "y": 10.0,
        "width": 50.0,
        "height": 50.0,
        "rotation": 0,
        "rectanglelabels": ["Circle"],
    }
    assert r["score"] == 0.9 and r["type"] == "rectanglelabels"
    assert (r["from_name"], r["to_name"], r["original_width"], r["original_height"]) == (
        "ctl",
        "im",
        200,
        100,
    )


def test_boxes_are_clipped_to_the_image_and_unmapped_classes_dropped():
    d = det(
        boxes=np.array([[-10.0, -5.0, 250.0, 50.0], [10, 10, 20, 20]]),
        confidences=np.array([0.8, 0.9]),
        classes=np.array([0, 1]),
    )
    (r,) = to_results(d, spec("RectangleLabels"), min_conf=0.25)  # class 1 (square) has no label
    assert r["value"]["x"] == 0 and r["value"]["width"] == 100 and r["value"]["height"] == 50


def test_polygons_in_percent():
    d = det(polygons=[np.array([[0, 0], [100, 0], [100, 50]], dtype=np.float32), np.zeros((0, 2))])
    (r,) = to_results(d, spec("PolygonLabels"), min_conf=0.25)
    assert r["value"]["points"] == [[0.0, 0.0], [50.0, 0.0], [50.0, 50.0]]
    assert r["value"]["polygonlabels"] == ["Circle"] and r["type"] == "polygonlabels"


def test_choices_take_the_top_class_if_confident_enough():
    s = spec("Choices", '<Choice value="Circle"/><Choice value="Square"/>')
    d = det(
        boxes=np.zeros((0, 4)), confidences=np.zeros(0), classes=np.zeros(0, int), probs=np.array([0.3, 0.7])
    )
    (r,) = to_results(d, s, min_conf=0.5)
    assert r["value"] == {"choices": ["Square"]} and r["score"] == pytest.approx(0.7)
    assert to_results(d, s, min_conf=0.8) == []
