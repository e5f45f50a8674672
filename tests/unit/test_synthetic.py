"""Fast checks of the synthetic shapes generator: the ground truth the starter models and fixtures rely on."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.synthetic import CLASSES, Shape, render_scene, write_yolo_dataset, yolo_label_line


def _point_in_polygon(x: float, y: float, poly: list[tuple[float, float]]) -> bool:
    inside = False
    for (x0, y0), (x1, y1) in zip(poly, poly[1:] + poly[:1], strict=True):
        if (y0 > y) != (y1 > y) and x < x0 + (y - y0) * (x1 - x0) / (y1 - y0):
            inside = not inside
    return inside


def _centroid(poly: list[tuple[float, float]]) -> tuple[float, float]:
    return (sum(p[0] for p in poly) / len(poly), sum(p[1] for p in poly) / len(poly))


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_render_scene_is_deterministic_by_seed() -> None:
    a_img, a_shapes = render_scene(np.random.default_rng(7), 200, 150)
    b_img, b_shapes = render_scene(np.random.default_rng(7), 200, 150)
    c_img, _ = render_scene(np.random.default_rng(8), 200, 150)
    assert np.array_equal(a_img, b_img)
    assert a_shapes == b_shapes
    assert not np.array_equal(a_img, c_img)


@pytest.mark.parametrize("size", [(640, 480), (160, 120), (96, 128)])
def test_scenes_hold_non_overlapping_shapes_inside_the_image(size: tuple[int, int]) -> None:
    width, height = size
    rng = np.random.default_rng(0)
    counts = set()
    for _ in range(30):
        img, shapes = render_scene(rng, width, height, max_shapes=3)
        assert img.shape == (height, width, 3) and img.dtype == np.uint8
        assert 1 <= len(shapes) <= 3
        counts.add(len(shapes))
        for s in shapes:
            assert 0 <= s.cls < len(CLASSES)
            x0, y0, x1, y1 = s.box
            assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
            cx, cy = _centroid(s.polygon)
            assert _point_in_polygon(cx, cy, s.polygon)
            # Filled: a solid colour at the centre, unlike the noisy background.
            patch = img[int(cy) - 1 : int(cy) + 2, int(cx) - 1 : int(cx) + 2].astype(float)
            assert patch.std(axis=(0, 1)).max() < 2.0
            for other in shapes:
                if other is not s:
                    assert not _point_in_polygon(cx, cy, other.polygon)
    assert len(counts) > 1  # the number of shapes varies


def test_shape_sizes_and_classes_vary() -> None:
    rng = np.random.default_rng(1)
    short = 480
    diameters, classes = [], set()
    for _ in range(40):
        _, shapes = render_scene(rng, 640, short)
        classes |= {s.cls for s in shapes}
        diameters += [s.box[2] - s.box[0] for s in shapes if CLASSES[s.cls] == "circle"]
    assert classes == set(range(len(CLASSES)))
    assert len(CLASSES) == 3 and CLASSES == ("circle", "square", "triangle")
    assert min(diameters) >= 0.11 * short and max(diameters) <= 0.41 * short
    assert max(diameters) - min(diameters) > 0.15 * short


def test_shape_box_and_label_lines() -> None:
    square = Shape(cls=1, polygon=[(10.0, 20.0), (30.0, 20.0), (30.0, 60.0), (10.0, 60.0)])
    assert square.box == (10.0, 20.0, 30.0, 60.0)
    assert yolo_label_line(square, 100, 200, "detect") == "1 0.200000 0.200000 0.200000 0.200000"
    assert yolo_label_line(square, 100, 200, "segment") == (
        "1 0.100000 0.100000 0.300000 0.100000 0.300000 0.300000 0.100000 0.300000"
    )


def _read_labels(path: Path) -> list[list[float]]:
    return [[float(v) for v in line.split()] for line in path.read_text().splitlines() if line.strip()]


def test_detect_and_segment_datasets_are_well_formed_and_agree(tmp_path: Path) -> None:
    det_yaml = write_yolo_dataset(tmp_path / "det", "detect", n_train=8, n_val=4, imgsz=128, seed=3)
    seg_yaml = write_yolo_dataset(tmp_path / "seg", "segment", n_train=8, n_val=4, imgsz=128, seed=3)
    root = tmp_path / "det"
    assert det_yaml == root / "data.yaml"
    text = det_yaml.read_text()
    assert f'path: "{root.resolve()}"' in text
    assert "train: images/train" in text and "val: images/val" in text
    for i, name in enumerate(CLASSES):
        assert f"  {i}: {name}" in text
    for split, n in (("train", 8), ("val", 4)):
        images = sorted((root / "images" / split).glob("*.jpg"))
        assert len(images) == n
        for img_path in images:
            det_lbl = root / "labels" / split / f"{img_path.stem}.txt"
            seg_lbl = seg_yaml.parent / "labels" / split / f"{img_path.stem}.txt"
            # Same seed, same pictures whatever the label format.
            assert img_path.read_bytes() == (seg_yaml.parent / "images" / split / img_path.name).read_bytes()
            with Image.open(img_path) as im:
                assert max(im.size) == 128
                rgb = np.asarray(im.convert("RGB"), dtype=float)
            boxes, polys = _read_labels(det_lbl), _read_labels(seg_lbl)
            assert 1 <= len(boxes) == len(polys)
            for box, poly in zip(boxes, polys, strict=True):
                assert len(box) == 5 and box[0] == poly[0] and int(box[0]) in range(len(CLASSES))
                assert len(poly) >= 7 and len(poly) % 2 == 1
                cx, cy, w, h = box[1:]
                assert all(0.0 <= v <= 1.0 for v in (*box[1:], *poly[1:]))
                xs, ys = poly[1::2], poly[2::2]
                assert (min(xs) + max(xs)) / 2 == pytest.approx(cx, abs=2e-6)
                assert (min(ys) + max(ys)) / 2 == pytest.approx(cy, abs=2e-6)
                assert max(xs) - min(xs) == pytest.approx(w, abs=2e-6)
                assert max(ys) - min(ys) == pytest.approx(h, abs=2e-6)
                # The label points at a drawn shape: a flat colour at the polygon's centre.
                px = int(sum(xs) / len(xs) * rgb.shape[1])
                py = int(sum(ys) / len(ys) * rgb.shape[0])
                assert rgb[py - 1 : py + 2, px - 1 : px + 2].std(axis=(0, 1)).max() < 6.0


def test_datasets_are_reproducible_and_val_independent_of_n_train(tmp_path: Path) -> None:
    write_yolo_dataset(tmp_path / "a", "detect", n_train=5, n_val=3, imgsz=96, seed=11)
    write_yolo_dataset(tmp_path / "b", "detect", n_train=5, n_val=3, imgsz=96, seed=11)
    write_yolo_dataset(tmp_path / "c", "detect", n_train=9, n_val=3, imgsz=96, seed=11)
    write_yolo_dataset(tmp_path / "d", "detect", n_train=5, n_val=3, imgsz=96, seed=12)
    a, b, c, d = (_tree_digest(tmp_path / x) for x in "abcd")
    drop_yaml = lambda t: {k: v for k, v in t.items() if k != "data.yaml"}  # noqa: E731 (yaml holds the path)
    assert drop_yaml(a) == drop_yaml(b)
    assert {k: v for k, v in drop_yaml(c).items() if "/val/" in k} == {
        k: v for k, v in drop_yaml(a).items() if "/val/" in k
    }
    assert drop_yaml(a) != drop_yaml(d)


def test_classify_layout(tmp_path: Path) -> None:
    root = write_yolo_dataset(tmp_path / "cls", "classify", n_train=9, n_val=6, imgsz=64, seed=0)
    assert root == (tmp_path / "cls").resolve()
    assert sorted(p.name for p in root.iterdir()) == ["train", "val"]
    for split, n in (("train", 9), ("val", 6)):
        assert tuple(sorted(p.name for p in (root / split).iterdir())) == CLASSES
        for name in CLASSES:
            files = list((root / split / name).glob("*.jpg"))
            assert len(files) == n // len(CLASSES)
            for f in files:
                with Image.open(f) as im:
                    assert im.size == (64, 64)


def test_rewriting_a_dataset_replaces_old_files(tmp_path: Path) -> None:
    write_yolo_dataset(tmp_path / "ds", "detect", n_train=6, n_val=2, imgsz=96, seed=0)
    write_yolo_dataset(tmp_path / "ds", "detect", n_train=3, n_val=2, imgsz=96, seed=0)
    assert len(list((tmp_path / "ds" / "images" / "train").iterdir())) == 3
    assert len(list((tmp_path / "ds" / "labels" / "train").iterdir())) == 3
