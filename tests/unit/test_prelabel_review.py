"""Annotators' changes to pre-labels, on constructed regions: matching, outcomes, grouping per model version,
and finding the prediction an annotation started from in what Label Studio's task list returns."""

from __future__ import annotations

import json

import pytest

from training.export import LabeledTask, ProjectExport, base_prediction
from training.jobs import prelabel_review
from training.prelabel_review import (
    Box,
    ReviewedTask,
    compare,
    model_version_of,
    rectangles,
    review,
)


def region(x, y, w, h, label="Circle", from_name="label", rotation=0, **extra):
    """A Label Studio rectangle region in percent of a 200x100 image."""
    return {
        "from_name": from_name,
        "to_name": "image",
        "type": "rectanglelabels",
        "original_width": 200,
        "original_height": 100,
        "value": {"x": x, "y": y, "width": w, "height": h, "rotation": rotation, "rectanglelabels": [label]},
        **extra,
    }


def outcomes(predicted, annotated):
    return [
        (o.outcome, o.predicted, o.annotated) for o in compare(rectangles(predicted), rectangles(annotated))
    ]


# --- one task ---------------------------------------------------------------------------------------------


def test_kept_nudged_moved_relabeled_deleted_and_added_regions():
    predicted = [
        region(10, 10, 20, 20, "Circle"),  # kept as it is
        region(50, 10, 20, 20, "Square"),  # nudged by 0.5 %: IoU 0.95, still accepted
        region(10, 60, 20, 20, "Circle"),  # moved by a quarter of its width: IoU 0.6, corrected
        region(50, 60, 20, 20, "Circle"),  # same box, other label: corrected
        region(80, 80, 10, 10, "Square"),  # deleted: rejected
    ]
    annotated = [
        region(10, 10, 20, 20, "Circle"),
        region(50.5, 10, 20, 20, "Square"),
        region(15, 60, 20, 20, "Circle"),
        region(50, 60, 20, 20, "Triangle"),
        region(80, 30, 10, 10, "Triangle"),  # drawn by the annotator: added
    ]
    got = compare(rectangles(predicted), rectangles(annotated))
    assert [(o.outcome, o.predicted, o.annotated) for o in got] == [
        ("accepted", "Circle", "Circle"),
        ("accepted", "Square", "Square"),
        ("corrected", "Circle", "Circle"),
        ("corrected", "Circle", "Triangle"),
        ("rejected", "Square", None),
        ("added", None, "Triangle"),
    ]
    assert got[1].iou == pytest.approx(19.5 / 20.5)
    assert got[2].iou == pytest.approx(0.6) and not got[2].label_changed
    assert got[3].label_changed


def test_matching_is_one_to_one_and_greedy_by_iou():
    # Two pre-labels on one drawn box: the closer one matches, the other was deleted.
    assert outcomes(
        [region(10, 10, 20, 20), region(12, 10, 20, 20)],
        [region(12.5, 10, 20, 20)],
    ) == [("rejected", "Circle", None), ("accepted", "Circle", "Circle")]
    # One pre-label over two drawn boxes: the best overlap matches it, the other box was added.
    assert outcomes(
        [region(10, 10, 20, 20)],
        [region(15, 10, 20, 20), region(11, 10, 20, 20)],
    ) == [("accepted", "Circle", "Circle"), ("added", None, "Circle")]
    # Greedy by IoU, whatever the labels: the relabeled box on top beats a same-label box further off.
    assert outcomes(
        [region(10, 10, 20, 20, "Circle")],
        [region(14, 10, 20, 20, "Circle"), region(10, 10, 20, 20, "Square")],
    ) == [("corrected", "Circle", "Square"), ("added", None, "Circle")]


def test_iou_thresholds():
    # IoU exactly 0.5 is a match (inclusive, as in the evaluation): a box of half the area inside it.
    half = compare(rectangles([region(0, 0, 50, 25)]), rectangles([region(0, 0, 25, 25)]))
    assert [o.outcome for o in half] == ["corrected"] and half[0].iou == 0.5
    # Just below: the pre-label was deleted and another box drawn.
    assert [
        o.outcome for o in compare(rectangles([region(0, 0, 50, 25)]), rectangles([region(0, 0, 24, 25)]))
    ] == [
        "rejected",
        "added",
    ]
    # The kept threshold decides accepted vs corrected for the same label.
    a, b = rectangles([region(10, 10, 20, 20)]), rectangles([region(11, 10, 20, 20)])  # IoU 19/21 = 0.905
    assert compare(a, b, kept_iou=0.9)[0].outcome == "accepted"
    assert compare(a, b, kept_iou=0.91)[0].outcome == "corrected"
    assert compare(a, b, match_iou=0.95)[0].outcome == "rejected"


def test_empty_sides():
    assert outcomes([], []) == []
    assert outcomes([region(10, 10, 20, 20)], []) == [("rejected", "Circle", None)]
    assert outcomes([], [region(10, 10, 20, 20)]) == [("added", None, "Circle")]


def test_which_regions_count():
    result = [
        region(10, 10, 20, 20, "Circle"),
        region(10, 10, 20, 20, "Circle", from_name="other"),  # another control
        {"from_name": "label", "type": "choices", "value": {"choices": ["x"]}},  # not a rectangle
        {**region(10, 10, 20, 20), "value": {"x": 10, "y": 10, "width": 20, "height": 20}},  # no label
        region(95, 10, 20, 20, "Square"),  # sticks out: clipped at the border, as for training
        region(120, 10, 20, 20, "Square"),  # outside the image: nothing to compare
        region(10, 10, 0, 20, "Square"),  # no area
        region(50, 50, 10, 10, "Triangle", rotation=90),  # rotated: the box around it
    ]
    boxes = rectangles(result, from_name="label")
    assert [b.label for b in boxes] == ["Circle", "Square", "Triangle"]
    assert boxes[0] == Box("Circle", pytest.approx((0.1, 0.1, 0.3, 0.3)))
    assert boxes[1].xyxy == pytest.approx((0.95, 0.1, 1.0, 0.3))
    # 10% of 200 px wide and 10% of 100 px high, turned 90 degrees clockwise about its top-left corner.
    assert boxes[2].xyxy == pytest.approx((0.45, 0.5, 0.5, 0.7))
    assert len(rectangles(result)) == 4  # without from_name, the other control's box counts too


# --- per model version ------------------------------------------------------------------------------------


def test_review_groups_by_model_version_with_the_stamp_stripped():
    assert model_version_of("v002-20261122T101010Z@20261122T103000Z") == "v002-20261122T101010Z"
    assert model_version_of("v002-20261122T101010Z") == "v002-20261122T101010Z"
    v2, v1 = "v002-20261122T101010Z", "v001-20261121T090000Z"
    tasks = [
        # the ML backend's prediction (bare version): everything kept
        ReviewedTask(1, v2, [region(10, 10, 20, 20, "Circle")], [region(10, 10, 20, 20, "Circle")]),
        # the ranking job's prediction of the same version (stamped): one moved, one deleted, one added
        ReviewedTask(
            2,
            v2 + "@20261122T103000Z",
            [region(10, 10, 20, 20, "Square"), region(60, 60, 10, 10, "Circle")],
            [region(15, 10, 20, 20, "Square"), region(30, 70, 10, 10, "Triangle")],
        ),
        # an older version's pre-label, relabeled
        ReviewedTask(3, v1, [region(10, 10, 20, 20, "Circle")], [region(10, 10, 20, 20, "Square")]),
        # an empty pre-label the annotator agreed with: a task left unchanged
        ReviewedTask(4, v2, [], []),
    ]
    r = review(tasks, from_name="label")
    assert set(r.versions) == {v1, v2}
    d = r.to_dict()
    json.dumps(d)  # goes into the model card as it is
    got = d["versions"][v2]
    assert {k: got[k] for k in ("tasks", "tasks_unchanged", "predicted", "annotated")} == {
        "tasks": 3,
        "tasks_unchanged": 2,
        "predicted": 3,
        "annotated": 3,
    }
    assert {
        k: got[k] for k in ("accepted", "corrected", "corrected_box", "corrected_label", "rejected", "added")
    } == {
        "accepted": 1,
        "corrected": 1,
        "corrected_box": 1,
        "corrected_label": 0,
        "rejected": 1,
        "added": 1,
    }
    assert got["acceptance_rate"] == pytest.approx(1 / 3, abs=1e-4)
    assert got["rejection_rate"] == pytest.approx(1 / 3, abs=1e-4)
    assert got["miss_rate"] == pytest.approx(1 / 3, abs=1e-4)
    # Per class: the model's mistakes under the predicted label, its misses under the drawn one.
    assert {
        c: (v["accepted"], v["corrected"], v["rejected"], v["added"]) for c, v in got["per_class"].items()
    } == {
        "Circle": (1, 0, 1, 0),
        "Square": (0, 1, 0, 0),
        "Triangle": (0, 0, 0, 1),
    }
    old = d["versions"][v1]
    assert (old["corrected_label"], old["acceptance_rate"], old["tasks_unchanged"]) == (1, 0.0, 0)
    assert d["match_iou"] == 0.5 and d["kept_iou"] == 0.9


def test_rates_are_none_without_regions():
    d = review([ReviewedTask(1, "v001", [], [])]).to_dict()["versions"]["v001"]
    assert (d["predicted"], d["acceptance_rate"], d["miss_rate"]) == (0, None, None)


# --- the prediction an annotation started from --------------------------------------------------------------


PREDICTIONS = [
    {
        "id": 7,
        "model_version": "v001",
        "result": [region(10, 10, 20, 20)],
        "score": 0.8,
        "created_at": "2026-11-22T10:00:00Z",
    },
    {
        "id": 9,
        "model_version": "v002@20261122T110000Z",
        "result": [],
        "score": 0.4,
        "created_at": "2026-11-22T11:00:00Z",
    },
    {"id": 12, "model_version": "v002", "result": [], "score": 0.5, "created_at": "2026-11-22T13:00:00Z"},
]


def test_base_prediction_is_the_parent_prediction():
    # As Label Studio 1.23.2 lists an annotation: parent_prediction is the prediction's id.
    got = base_prediction({"parent_prediction": 9, "created_at": "2026-11-22T12:00:00Z"}, PREDICTIONS, "v001")
    assert got is not None and (got.prediction_id, got.model_version, got.source) == (
        9,
        "v002@20261122T110000Z",
        "parent_prediction",
    )
    first = base_prediction({"parent_prediction": 7}, PREDICTIONS)
    assert first.result == (region(10, 10, 20, 20),) and first.score == 0.8
    # A parent that no longer exists: nothing to compare with (not some other prediction).
    assert base_prediction({"parent_prediction": 99}, PREDICTIONS, "v001") is None


def test_base_prediction_without_a_parent():
    # The annotation's own snapshot, as an export has it.
    snap = {"id": 3, "model_version": "v000", "result": [], "score": None}
    assert (
        base_prediction({"parent_prediction": None, "prediction": snap}, PREDICTIONS).source == "annotation"
    )
    assert base_prediction({"prediction": {}}, PREDICTIONS) is None  # Label Studio's "no prediction"
    # What Label Studio would have snapshotted: the prediction of the project's model_version made before.
    ann = {"parent_prediction": None, "created_at": "2026-11-22T12:00:00Z"}
    got = base_prediction(ann, PREDICTIONS, "v001")
    assert (got.prediction_id, got.source) == (7, "project_model_version")
    assert base_prediction(ann, PREDICTIONS, "v002") is None  # v002's prediction came after the annotation
    assert base_prediction(ann, PREDICTIONS, "annoloop") is None  # model_version names the ML backend
    assert base_prediction(ann, PREDICTIONS, "") is None


def test_job_reviews_only_tasks_with_a_base_prediction():
    def task(i, prediction, result):
        return LabeledTask(i, {}, i, "", tuple(result), prediction)

    p = base_prediction({"parent_prediction": 7}, PREDICTIONS)
    export = ProjectExport(
        1,
        "t",
        "",
        [
            task(1, p, [region(10, 10, 20, 20)]),
            task(2, None, [region(10, 10, 20, 20)]),  # labeled from scratch: not a review of anything
            task(3, p, [region(10, 10, 20, 20, from_name="other")]),  # another control's box is not compared
        ],
    )
    got = prelabel_review(export, "label").to_dict()["versions"]
    assert list(got) == ["v001"]
    assert (got["v001"]["tasks"], got["v001"]["accepted"], got["v001"]["rejected"], got["v001"]["added"]) == (
        2,
        1,
        1,
        0,
    )
