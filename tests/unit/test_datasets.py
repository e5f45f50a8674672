"""The three dataset readers agree on the same boxes; bad boxes are clipped or dropped and counted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from annoloop.datasets import DatasetFormatError, read_dataset, rectangle_config, to_result
from ml_backend.label_config import parse_label_config

LABELS = ["cat", "dog"]
# (image name, width, height, [(label, x0, y0, x1, y1)])
IMAGES = [
    ("a.png", 80, 60, [("cat", 10, 5, 30, 25), ("dog", 40, 20, 79, 59)]),
    ("b.png", 100, 50, []),
    ("c.png", 40, 40, [("dog", 0, 0, 20, 10)]),
]


def _images(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, w, h, _ in IMAGES:
        Image.new("RGB", (w, h)).save(folder / name)


def _voc(root: Path) -> Path:
    _images(root / "JPEGImages")
    (root / "Annotations").mkdir()
    for name, _, _, boxes in IMAGES:
        objects = "".join(
            f"<object><name>{lab}</name><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax>"
            f"<ymax>{y1}</ymax></bndbox></object>"
            for lab, x0, y0, x1, y1 in boxes
        )
        (root / "Annotations" / f"{Path(name).stem}.xml").write_text(
            f"<annotation><filename>{name}</filename>{objects}</annotation>"
        )
    return root


def _yolo(root: Path) -> Path:
    _images(root / "images" / "train")
    (root / "labels" / "train").mkdir(parents=True)
    (root / "data.yaml").write_text("names:\n  0: cat\n  1: dog\n")
    for name, w, h, boxes in IMAGES:
        lines = [
            f"{LABELS.index(lab)} {(x0 + x1) / 2 / w} {(y0 + y1) / 2 / h} {(x1 - x0) / w} {(y1 - y0) / h}"
            for lab, x0, y0, x1, y1 in boxes
        ]
        (root / "labels" / "train" / f"{Path(name).stem}.txt").write_text("\n".join(lines))
    return root


def _coco(root: Path) -> Path:
    _images(root / "images")
    (root / "annotations").mkdir(parents=True)
    doc = {
        "images": [
            {"id": i, "file_name": n, "width": w, "height": h} for i, (n, w, h, _) in enumerate(IMAGES)
        ],
        "categories": [{"id": 7, "name": "cat"}, {"id": 9, "name": "dog"}],
        "annotations": [
            {
                "id": 100 * i + j,
                "image_id": i,
                "category_id": 7 if lab == "cat" else 9,
                "bbox": [x0, y0, x1 - x0, y1 - y0],
            }
            for i, (_, _, _, boxes) in enumerate(IMAGES)
            for j, (lab, x0, y0, x1, y1) in enumerate(boxes)
        ],
    }
    (root / "annotations" / "instances_val.json").write_text(json.dumps(doc))
    return root


@pytest.mark.parametrize("fmt,make", [("voc", _voc), ("yolo", _yolo), ("coco", _coco)])
def test_readers_agree(tmp_path, fmt, make):
    ds = read_dataset(fmt, make(tmp_path / fmt))
    assert ds.labels == LABELS and ds.dropped_boxes == 0
    got = {
        im.path.name: (im.width, im.height, [(b.label, b.x0, b.y0, b.x1, b.y1) for b in im.boxes])
        for im in ds.images
    }
    for name, w, h, boxes in IMAGES:
        gw, gh, gboxes = got[name]
        assert (gw, gh) == (w, h)
        assert [b[0] for b in gboxes] == [b[0] for b in boxes]
        for g, e in zip(gboxes, boxes, strict=True):
            assert g[1:] == pytest.approx(e[1:], abs=1e-6)
    if fmt == "yolo":
        assert {im.split for im in ds.images} == {"train"}
    if fmt == "coco":
        assert {im.split for im in ds.images} == {"val"}


def test_out_of_image_boxes_are_clipped_and_empty_ones_dropped(tmp_path):
    root = _voc(tmp_path / "voc")
    (root / "Annotations" / "c.xml").write_text(
        "<annotation><filename>c.png</filename>"
        "<object><name>dog</name><bndbox><xmin>-5</xmin><ymin>30</ymin><xmax>50</xmax><ymax>60</ymax></bndbox></object>"
        "<object><name>dog</name><bndbox><xmin>45</xmin><ymin>45</ymin><xmax>60</xmax><ymax>60</ymax></bndbox></object>"
        "<object><name>dog</name><bndbox><xmin>x</xmin><ymin>1</ymin><xmax>2</xmax><ymax>3</ymax></bndbox></object>"
        "</annotation>"
    )
    ds = read_dataset("voc", root)
    (c,) = [im for im in ds.images if im.path.name == "c.png"]
    assert [(b.x0, b.y0, b.x1, b.y1) for b in c.boxes] == [(0, 30, 40, 40)]
    assert ds.dropped_boxes == 2


def test_wrong_format_is_a_clear_error(tmp_path):
    root = _voc(tmp_path / "voc")
    with pytest.raises(DatasetFormatError, match="not a YOLO dataset"):
        read_dataset("yolo", root)
    with pytest.raises(DatasetFormatError, match="not a COCO dataset"):
        read_dataset("coco", root)
    with pytest.raises(DatasetFormatError, match="not a folder"):
        read_dataset("voc", tmp_path / "missing")


def test_result_and_config_fit_together(tmp_path):
    ds = read_dataset("voc", _voc(tmp_path / "voc"))
    (control,) = parse_label_config(rectangle_config(ds.labels))
    assert control.labels == ("cat", "dog") and control.data_key == "image"
    (a,) = [im for im in ds.images if im.path.name == "a.png"]
    r = to_result(a)
    assert r[1]["value"]["x"] == pytest.approx(50.0) and r[1]["value"]["y"] == pytest.approx(100 * 20 / 60)
    assert r[1]["value"]["width"] == pytest.approx(100 * 39 / 80) and r[1]["value"]["rectanglelabels"] == [
        "dog"
    ]
    assert r[0]["original_width"] == 80 and r[0]["from_name"] == "label" and r[0]["to_name"] == "image"
