"""Pure parts of the retraining data path: the split, Label Studio boxes -> YOLO, the dataset writer, and
the TP/FP/FN matching the evaluation uses, on hand-computed cases."""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pytest
from PIL import Image

from ml_backend.label_config import parse_label_config
from training.dataset import (
    DatasetError,
    DatasetReport,
    ImageCache,
    build_dataset,
    convert_result,
    detection_control,
    label_text,
    rectangle_to_yolo,
    split_of,
)
from training.evaluate import ErrorAnalysis, box_iou, grid_cell, match_detections, prf, size_bucket
from training.export import LabeledTask, ProjectExport, latest_annotation

CONFIG = """<View><Image name="image" value="$image"/>
<RectangleLabels name="label" toName="image"><Label value="Circle"/><Label value="Square"/></RectangleLabels>
<Choices name="quality" toName="image"><Choice value="ok"/></Choices></View>"""


def rect(x, y, w, h, label="Circle", rotation=0, from_name="label", **extra):
    return {
        "from_name": from_name,
        "to_name": "image",
        "type": "rectanglelabels",
        "value": {"x": x, "y": y, "width": w, "height": h, "rotation": rotation, "rectanglelabels": [label]},
        **extra,
    }


# --- split --------------------------------------------------------------------------------------------


def test_split_is_a_stable_hash_of_the_task_id():
    # sha1("1") starts 356a192b7913b04c: 0x356a192b7913b04c / 2**64 = 0.2087
    assert hashlib.sha1(b"1").hexdigest().startswith("356a192b7913b04c")
    assert split_of(1, 0.20) == "train"
    assert split_of(1, 0.21) == "holdout"
    # Pinned: if these move, every project's held-out set moves with them.
    assert [t for t in range(1, 41) if split_of(t, 0.2) == "holdout"] == [4, 9, 11, 16, 17, 22, 28, 30]


def test_split_fraction_and_nesting():
    ids = range(1, 20001)
    held = {t for t in ids if split_of(t, 0.2) == "holdout"}
    assert 0.19 < len(held) / 20000 < 0.21
    # A larger fraction only adds tasks to the held-out side: none moves from held-out into training.
    assert held < {t for t in ids if split_of(t, 0.3) == "holdout"}


# --- boxes --------------------------------------------------------------------------------------------


def test_percent_box_to_yolo():
    box, status = rectangle_to_yolo({"x": 10, "y": 20, "width": 30, "height": 40}, 1, 200, 100)
    assert status == "ok"
    assert (box.cls, box.cx, box.cy, box.w, box.h) == pytest.approx((1, 0.25, 0.40, 0.30, 0.40))
    assert box.line() == "1 0.250000 0.400000 0.300000 0.400000"


def test_box_sticking_out_is_clipped_at_the_border():
    box, status = rectangle_to_yolo({"x": 90, "y": -10, "width": 20, "height": 30}, 0, 100, 100)
    assert status == "clipped"
    # x 90..100 (was 110), y 0 (was -10)..20
    assert (box.cx, box.cy, box.w, box.h) == pytest.approx((0.95, 0.10, 0.10, 0.20))


def test_float_noise_at_the_border_is_not_clipping():
    box, status = rectangle_to_yolo({"x": 0, "y": 0, "width": 100.00000000000001, "height": 50}, 0, 64, 64)
    assert status == "ok" and box.w == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("value", "status"),
    [
        ({"x": 101, "y": 10, "width": 5, "height": 5}, "out_of_bounds"),
        ({"x": -30, "y": 10, "width": 20, "height": 5}, "out_of_bounds"),  # ends at x = -10
        ({"x": 10, "y": 100, "width": 5, "height": 5}, "out_of_bounds"),  # starts on the bottom edge
        ({"x": 10, "y": 10, "width": 0, "height": 5}, "degenerate"),
        ({"x": 10, "y": 10, "width": -5, "height": 5}, "degenerate"),
        ({"x": 10, "y": 10, "width": 0.4, "height": 5}, "degenerate"),  # 0.4% of 200 px = 0.8 px < 1 px
        ({"x": 99.8, "y": 10, "width": 20, "height": 5}, "degenerate"),  # clipped to 0.2% = 0.4 px
        ({"y": 10, "width": 5, "height": 5}, "malformed"),
        ({"x": "left", "y": 10, "width": 5, "height": 5}, "malformed"),
        ({"x": float("nan"), "y": 10, "width": 5, "height": 5}, "malformed"),
    ],
)
def test_unusable_boxes_are_dropped_with_a_reason(value, status):
    assert rectangle_to_yolo(value, 0, 200, 200) == (None, status)


def test_rotated_box_becomes_its_axis_aligned_bounds():
    # 20x10 px at (50, 10), rotated 90 degrees clockwise about its top-left corner on a 100x100 image:
    # corners (50,10) (50,30) (40,30) (40,10) -> x 40..50, y 10..30.
    box, status = rectangle_to_yolo(
        {"x": 50, "y": 10, "width": 20, "height": 10, "rotation": 90}, 0, 100, 100
    )
    assert status == "rotated"
    assert (box.cx, box.cy, box.w, box.h) == pytest.approx((0.45, 0.20, 0.10, 0.20))


def test_convert_result_counts_what_it_drops():
    control = detection_control(CONFIG)
    assert control.labels == ("Circle", "Square")
    report = DatasetReport()
    result = [
        rect(10, 10, 20, 20, "Square"),
        rect(90, 10, 20, 20, "Circle"),  # clipped
        rect(120, 10, 20, 20, "Circle"),  # outside
        rect(10, 10, 0, 20, "Circle"),  # degenerate
        rect(10, 10, 20, 20, "Hexagon"),  # not in the config
        rect(10, 10, 20, 20, "Hexagon"),
        {**rect(10, 10, 20, 20), "value": {"x": 1, "y": 1, "width": 5, "height": 5, "rectanglelabels": []}},
        {"from_name": "quality", "to_name": "image", "type": "choices", "value": {"choices": ["ok"]}},
    ]
    boxes = convert_result(result, control, control.labels, 200, 100, report)
    assert [b.cls for b in boxes] == [1, 0]
    assert (boxes[0].cx, boxes[0].cy, boxes[0].w, boxes[0].h) == pytest.approx((0.2, 0.2, 0.2, 0.2))
    assert (report.boxes_clipped, report.dropped_out_of_bounds, report.dropped_degenerate) == (1, 1, 1)
    assert report.unknown_labels == {"Hexagon": 2}
    assert (report.dropped_no_label, report.other_regions) == (1, 1)


def test_region_size_is_taken_from_label_studio_when_given():
    control = detection_control(CONFIG)
    report = DatasetReport()
    # 0.5% of the 1000 px Label Studio measured is 5 px: kept, although 0.5% of the 100 px passed is 0.5 px.
    region = rect(10, 10, 0.5, 10, original_width=1000, original_height=1000)
    assert len(convert_result([region], control, control.labels, 100, 100, report)) == 1


def test_negative_image_has_an_empty_label_file():
    assert label_text([]) == ""


def test_config_without_rectangles_is_refused():
    with pytest.raises(DatasetError, match="RectangleLabels"):
        detection_control(
            '<View><Image name="i" value="$image"/><Choices name="c" toName="i"><Choice value="a"/></Choices></View>'
        )


def test_latest_non_cancelled_annotation_counts():
    anns = [
        {"id": 1, "updated_at": "2025-01-01T10:00:00Z", "was_cancelled": False, "result": ["old"]},
        {"id": 2, "updated_at": "2025-01-03T10:00:00Z", "was_cancelled": True, "result": []},
        {"id": 3, "updated_at": "2025-01-02T10:00:00Z", "was_cancelled": False, "result": ["new"]},
    ]
    assert latest_annotation(anns)["id"] == 3
    assert latest_annotation([anns[1]]) is None
    assert latest_annotation([]) is None


# --- the dataset writer (local images, no network) ------------------------------------------------------


def _png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((h, w, 3), 120, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_build_dataset_writes_yolo_files_and_reads_images_once(tmp_path):
    images = {f"/data/upload/1/{i}.png": _png(40, 20) for i in range(1, 13)}
    images["/data/upload/1/broken.png"] = b"not an image"
    calls: list[str] = []

    def download(url: str) -> bytes:
        calls.append(url)
        return images[url]

    tasks = [
        LabeledTask(i, {"image": f"/data/upload/1/{i}.png"}, 100 + i, "t", (rect(10, 10, 50, 50),))
        for i in range(1, 11)
    ]
    tasks += [
        LabeledTask(11, {"image": "/data/upload/1/11.png"}, 111, "t", ()),  # negative
        LabeledTask(12, {"image": "/data/upload/1/broken.png"}, 112, "t", (rect(1, 1, 5, 5),)),
        LabeledTask(13, {"text": "no image"}, 113, "t", (rect(1, 1, 5, 5),)),
    ]
    export = ProjectExport(1, "p", CONFIG, tasks, {"only_cancelled": 2})
    cache = ImageCache(tmp_path / "cache")
    ds = build_dataset(
        export, tmp_path / "a", holdout_fraction=0.3, download=download, cache=cache, max_pixels=10**6
    )
    assert ds.classes == ("Circle", "Square")
    assert set(ds.train_ids).isdisjoint(ds.holdout_ids)
    assert sorted(ds.train_ids + ds.holdout_ids) == list(range(1, 12))
    assert ds.holdout_ids == [t for t in range(1, 12) if split_of(t, 0.3) == "holdout"]
    r = ds.report
    assert (r.tasks_exported, r.tasks_used, r.negative_images, r.boxes) == (13, 11, 1, 10)
    assert list(r.unreadable_images) == ["12"] and "not a readable image" in r.unreadable_images["12"]
    assert r.tasks_without_image == 1 and r.export_skipped == {"only_cancelled": 2}
    side = "val" if split_of(11, 0.3) == "holdout" else "train"
    assert (ds.root / "labels" / side / "11.txt").read_text() == ""
    side = "val" if split_of(1, 0.3) == "holdout" else "train"
    assert (ds.root / "labels" / side / "1.txt").read_text() == "0 0.350000 0.350000 0.500000 0.500000\n"
    assert (ds.root / "images" / side / "1.png").read_bytes() == images["/data/upload/1/1.png"]
    assert 'names:\n  0: "Circle"\n  1: "Square"\n' in ds.data_yaml.read_text()

    # A second build downloads nothing that decoded the first time, and puts every task on the same side.
    calls.clear()
    again = build_dataset(
        export, tmp_path / "b", holdout_fraction=0.3, download=download, cache=cache, max_pixels=10**6
    )
    assert calls == ["/data/upload/1/broken.png"]
    assert (again.train_ids, again.holdout_ids) == (ds.train_ids, ds.holdout_ids)
    assert again.report.images_from_cache == 11


# --- matching -------------------------------------------------------------------------------------------


def test_box_iou_by_hand():
    iou = box_iou(np.array([[0, 0, 2, 2]]), np.array([[1, 1, 3, 3], [0, 0, 2, 2], [5, 5, 6, 6]]))
    assert iou == pytest.approx(np.array([[1 / 7, 1.0, 0.0]]))


def M(pred, pcls, score, gt, gcls, thr=0.5):
    return match_detections(
        np.array(pred, float), np.array(pcls), np.array(score), np.array(gt, float), np.array(gcls), thr
    )


def test_exact_hit_is_a_true_positive():
    m = M([[0, 0, 1, 1]], [0], [0.9], [[0, 0, 1, 1]], [0])
    assert (m.tp, m.fp, m.fn) == (1, 0, 0)


def test_duplicate_box_is_a_false_positive_and_the_best_scored_one_wins():
    m = M([[0, 0, 1, 1], [0, 0, 1, 1]], [0, 0], [0.3, 0.9], [[0, 0, 1, 1]], [0])
    assert (m.tp, m.fp, m.fn) == (1, 1, 0)
    assert m.pred_tp.tolist() == [False, True]


def test_wrong_class_is_a_false_positive_and_a_miss():
    m = M([[0, 0, 1, 1]], [1], [0.9], [[0, 0, 1, 1]], [0])
    assert (m.tp, m.fp, m.fn) == (0, 1, 1)


def test_iou_threshold_is_inclusive():
    # [0,0,1,1] vs [0,0,1,0.5]: intersection 0.5, union 1 -> IoU exactly 0.5: a hit.
    assert M([[0, 0, 1, 0.5]], [0], [0.9], [[0, 0, 1, 1]], [0]).tp == 1
    # [0,0,1,0.49]: IoU 0.49: a miss and a false positive.
    m = M([[0, 0, 1, 0.49]], [0], [0.9], [[0, 0, 1, 1]], [0])
    assert (m.tp, m.fp, m.fn) == (0, 1, 1)


def test_greedy_matching_by_score():
    # A (0.9) overlaps G1 (IoU 0.6) and G2 (IoU 0.75); it takes G2, the higher IoU.
    # B (0.8) overlaps only G2, already taken: B is a FP and G1 a FN.
    g1, g2 = [0, 0, 10, 10], [4, 0, 14, 10]
    a = [2.5, 0, 12.5, 10]  # with G1: 7.5/12.5 = 0.6; with G2: 8.5/11.5 = 0.739
    b = [4, 0, 14, 10]
    assert box_iou(np.array([a]), np.array([g1, g2])) == pytest.approx(np.array([[0.6, 8.5 / 11.5]]))
    m = M([a, b], [0, 0], [0.9, 0.8], [g1, g2], [0, 0])
    assert m.pred_gt.tolist() == [1, -1]
    assert (m.tp, m.fp, m.fn) == (1, 1, 1)


def test_nothing_to_match():
    assert (lambda m: (m.tp, m.fp, m.fn))(M(np.zeros((0, 4)), [], [], [[0, 0, 1, 1]], [0])) == (0, 0, 1)
    assert (lambda m: (m.tp, m.fp, m.fn))(M([[0, 0, 1, 1]], [0], [0.5], np.zeros((0, 4)), [])) == (0, 1, 0)


def test_prf_by_hand():
    assert prf(3, 1, 2) == pytest.approx({"precision": 0.75, "recall": 0.6, "f1": 2 * 0.45 / 1.35})
    assert prf(0, 0, 0) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}


def test_size_buckets_and_grid_cells():
    assert size_bucket([0, 0, 0.05, 0.1]) == "small"  # 0.005 of the image
    assert size_bucket([0, 0, 0.1, 0.1]) == "medium"  # 0.01: the small limit is exclusive
    assert size_bucket([0, 0, 0.5, 0.2]) == "large"  # 0.1
    assert grid_cell([0, 0, 0.1, 0.1]) == (0, 0)
    assert grid_cell([0.4, 0.4, 0.6, 0.6]) == (1, 1)
    assert grid_cell([0.9, 0.5, 1.0, 1.0]) == (2, 2)  # centre (0.95, 0.75)
    assert grid_cell([0.0, 0.9, 0.2, 1.0]) == (2, 0)


def test_error_analysis_by_class_size_position_and_kind():
    names = ("Circle", "Square")
    gt = np.array([[0.0, 0.0, 0.5, 0.5], [0.8, 0.8, 0.85, 0.85], [0.4, 0.0, 0.6, 0.2]])
    gcls = np.array([0, 1, 1])
    pred = np.array(
        [
            [0.0, 0.0, 0.5, 0.5],  # TP on gt 0
            [0.0, 0.0, 0.5, 0.5],  # duplicate of gt 0
            [0.4, 0.0, 0.6, 0.2],  # right place, wrong class (Circle on a Square)
            [0.4, 0.4, 0.45, 0.45],  # background, small, centre cell
        ]
    )
    pcls = np.array([0, 0, 0, 1])
    m = match_detections(pred, pcls, np.array([0.9, 0.8, 0.7, 0.6]), gt, gcls)
    errors = ErrorAnalysis()
    errors.add(m, pred, pcls, gt, gcls, names)
    assert errors.fn_by_class == {"Square": 2}
    assert errors.fp_by_class == {"Circle": 2, "Square": 1}
    assert errors.fn_by_size == {"small": 1, "medium": 1, "large": 0}  # 0.0025 and 0.04
    assert errors.fn_by_cell[2][2] == 1 and errors.fn_by_cell[0][1] == 1
    assert errors.fp_by_cell[1][1] == 1 and errors.fp_by_cell[0][0] == 1 and errors.fp_by_cell[0][1] == 1
    assert errors.fp_kinds == {"duplicate": 1, "wrong_class": 1, "localization": 0, "background": 1}
    assert errors.confusions == {"Circle -> Square": 1}


def test_parse_label_config_is_what_the_backend_uses():
    # The dataset's classes and the backend's label mapping read the same parse.
    assert detection_control(CONFIG) == parse_label_config(CONFIG)[0]
