"""Turn exported Label Studio tasks into a YOLO detection dataset: split, convert, fetch, write.

The conversion and the split are pure functions (unit-tested on hand-computed cases); only
:func:`build_dataset` touches the network and the disk.

Why a hash split: a task's side must never change between runs, or a model would be evaluated on tasks it
was trained on the version before. ``sha1(str(task_id))`` depends on nothing but the task id (and the
configured fraction), so a task keeps its side as the project grows, across machines and restarts.

Why images are cached by URL: Label Studio uploads and local files do not change behind a URL, and every
retraining needs all labeled images again; downloading them once per project saves most of a run's I/O.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import tempfile
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from annoloop.images import ImageError, decode_image
from ml_backend.label_config import Control, LabelConfigError, parse_label_config
from training.export import LabeledTask, ProjectExport

log = logging.getLogger(__name__)

Split = Literal["train", "holdout"]
#: Folder name of each side in the YOLO dataset (ultralytics calls the evaluation split "val").
SPLIT_DIRS: dict[str, str] = {"train": "train", "holdout": "val"}

#: Coordinates may overshoot the image by float noise (Label Studio stores e.g. 100.00000000000001);
#: only overshoots beyond this many percent count as clipping.
_CLIP_TOLERANCE_PCT = 1e-6
#: A box narrower or lower than this many pixels (after clipping) cannot be learned from: dropped.
MIN_BOX_PX = 1.0
#: Formats ultralytics reads from disk as they are; other formats are re-encoded as PNG.
_DIRECT_FORMATS = {"JPEG": ".jpg", "PNG": ".png", "BMP": ".bmp", "WEBP": ".webp", "TIFF": ".tif"}
_EXIF_ORIENTATION = 0x0112


class DatasetError(ValueError):
    """The project cannot be turned into a detection dataset; the message says what to change."""


# --- pure logic --------------------------------------------------------------------------------------


def split_of(task_id: int, holdout_fraction: float) -> Split:
    """Which side a task is on: ``holdout`` for a stable ``holdout_fraction`` of task ids, else ``train``."""
    digest = hashlib.sha1(f"{task_id}".encode()).digest()
    position = int.from_bytes(digest[:8], "big") / 2**64  # uniform in [0, 1)
    return "holdout" if position < holdout_fraction else "train"


@dataclass(frozen=True)
class YoloBox:
    """One box in YOLO's normalised format: class index, centre x/y, width, height (all in 0..1)."""

    cls: int
    cx: float
    cy: float
    w: float
    h: float

    def line(self) -> str:
        return f"{self.cls} {self.cx:.6f} {self.cy:.6f} {self.w:.6f} {self.h:.6f}"

    def xyxy(self) -> tuple[float, float, float, float]:
        return (self.cx - self.w / 2, self.cy - self.h / 2, self.cx + self.w / 2, self.cy + self.h / 2)


@dataclass
class DatasetReport:
    """Counts of everything the conversion changed or left out, so a model card can say what it saw."""

    tasks_exported: int = 0
    tasks_used: int = 0
    train_tasks: int = 0
    holdout_tasks: int = 0
    negative_images: int = 0
    boxes: int = 0
    boxes_per_class: dict[str, int] = field(default_factory=dict)
    boxes_clipped: int = 0
    boxes_rotated: int = 0
    dropped_degenerate: int = 0
    dropped_out_of_bounds: int = 0
    dropped_malformed: int = 0
    dropped_no_label: int = 0
    unknown_labels: dict[str, int] = field(default_factory=dict)
    multi_label_regions: int = 0
    other_regions: int = 0
    tasks_without_image: int = 0
    unreadable_images: dict[str, str] = field(default_factory=dict)  # task id -> reason
    images_downloaded: int = 0
    images_from_cache: int = 0
    export_skipped: dict[str, int] = field(default_factory=dict)
    project_stats: dict[str, int | None] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _bump(counts: dict[str, int], key: str, n: int = 1) -> None:
    counts[key] = counts.get(key, 0) + n


def rectangle_to_yolo(
    value: Mapping[str, Any], cls: int, img_w: float, img_h: float
) -> tuple[YoloBox | None, str]:
    """A Label Studio rectangle (percent x, y, width, height, rotation in degrees) -> YOLO box and status.

    Status: ``ok``, ``clipped`` (it stuck out of the image and was cut at the border), ``rotated`` (the
    axis-aligned box around the rotated rectangle; Label Studio rotates clockwise about the top-left
    corner), or, with no box, ``malformed``, ``out_of_bounds`` (nothing left inside the image) and
    ``degenerate`` (less than ``MIN_BOX_PX`` wide or high). ``img_w``/``img_h`` are the image's pixel
    size; they only matter for rotation and the minimum size, since percentages already normalise.
    """
    try:
        x, y = float(value["x"]), float(value["y"])
        w, h = float(value["width"]), float(value["height"])
        rotation = float(value.get("rotation") or 0.0)
    except (KeyError, TypeError, ValueError):
        return None, "malformed"
    if not all(math.isfinite(v) for v in (x, y, w, h, rotation)) or img_w <= 0 or img_h <= 0:
        return None, "malformed"
    if w <= 0 or h <= 0:
        return None, "degenerate"
    status = "ok"
    x0, y0, x1, y1 = x, y, x + w, y + h
    if rotation % 360:
        # Corners in pixels (rotation is an angle in pixel space), rotated about (x, y), back to percent.
        px, py = x * img_w / 100, y * img_h / 100
        pw, ph = w * img_w / 100, h * img_h / 100
        t = math.radians(rotation)
        c, s = math.cos(t), math.sin(t)
        xs = [px + dx * c - dy * s for dx, dy in ((0, 0), (pw, 0), (pw, ph), (0, ph))]
        ys = [py + dx * s + dy * c for dx, dy in ((0, 0), (pw, 0), (pw, ph), (0, ph))]
        x0, x1 = min(xs) * 100 / img_w, max(xs) * 100 / img_w
        y0, y1 = min(ys) * 100 / img_h, max(ys) * 100 / img_h
        status = "rotated"
    if x1 <= 0 or y1 <= 0 or x0 >= 100 or y0 >= 100:
        return None, "out_of_bounds"
    tol = _CLIP_TOLERANCE_PCT
    if x0 < -tol or y0 < -tol or x1 > 100 + tol or y1 > 100 + tol:
        status = "clipped" if status == "ok" else status
    x0, y0, x1, y1 = max(x0, 0.0), max(y0, 0.0), min(x1, 100.0), min(y1, 100.0)
    if (x1 - x0) * img_w / 100 < MIN_BOX_PX or (y1 - y0) * img_h / 100 < MIN_BOX_PX:
        return None, "degenerate"
    box = YoloBox(cls, (x0 + x1) / 200, (y0 + y1) / 200, (x1 - x0) / 100, (y1 - y0) / 100)
    return box, status


def convert_result(
    result: Sequence[Mapping[str, Any]],
    control: Control,
    classes: Sequence[str],
    img_w: int,
    img_h: int,
    report: DatasetReport,
) -> list[YoloBox]:
    """The YOLO boxes of one annotation's result for ``control``; what is changed or dropped is counted.

    ``img_w``/``img_h``: the pixel size of the image as annotators saw it (EXIF rotation applied); a
    region's own ``original_width``/``original_height`` win when present, since the percentages are
    relative to what Label Studio measured.
    """
    index = {name: i for i, name in enumerate(classes)}
    boxes: list[YoloBox] = []
    for region in result:
        if region.get("from_name") != control.from_name or region.get("type") != "rectanglelabels":
            report.other_regions += 1
            continue
        value = region.get("value") or {}
        labels = value.get("rectanglelabels") or []
        if not isinstance(labels, list) or not labels:
            report.dropped_no_label += 1
            continue
        if len(labels) > 1:
            report.multi_label_regions += 1  # one box per region: the first label wins
        label = str(labels[0])
        if label not in index:
            _bump(report.unknown_labels, label)
            continue
        width = region.get("original_width") or img_w
        height = region.get("original_height") or img_h
        box, status = rectangle_to_yolo(value, index[label], float(width), float(height))
        if box is None:
            if status == "malformed":
                report.dropped_malformed += 1
            elif status == "out_of_bounds":
                report.dropped_out_of_bounds += 1
            else:
                report.dropped_degenerate += 1
            continue
        report.boxes_clipped += status == "clipped"
        report.boxes_rotated += status == "rotated"
        boxes.append(box)
    return boxes


def label_text(boxes: Sequence[YoloBox]) -> str:
    """A YOLO label file's text; empty for a negative image (labeled, nothing in it)."""
    return "".join(b.line() + "\n" for b in boxes)


def detection_control(label_config: str) -> Control:
    """The RectangleLabels control training fills (the first one, when a config has several)."""
    try:
        controls = parse_label_config(label_config)
    except LabelConfigError as e:
        raise DatasetError(str(e)) from None
    for control in controls:
        if control.tag == "RectangleLabels":
            if not control.labels:
                raise DatasetError(f"<RectangleLabels name={control.from_name!r}> has no <Label>")
            return control
    raise DatasetError(
        "the labeling config has no <RectangleLabels> on an <Image>: annoloop trains detection models only"
    )


# --- disk and network ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabeledImage:
    """An image of the dataset with its ground truth, for evaluation (held-out, or a training-split sample)."""

    task_id: int
    image: Path
    width: int
    height: int
    boxes: tuple[YoloBox, ...]


#: The name evaluation code used before training images were kept too.
HeldOutImage = LabeledImage


@dataclass
class Dataset:
    """A YOLO dataset on disk (``data.yaml`` + images/labels per split) and what went into it."""

    root: Path
    data_yaml: Path
    classes: tuple[str, ...]
    control: Control
    train_ids: list[int]
    holdout_ids: list[int]
    holdout: list[LabeledImage]
    report: DatasetReport
    #: The training images with their ground truth (for the training-split metric the overfitting rule needs).
    train: list[LabeledImage] = field(default_factory=list)

    @property
    def holdout_boxes(self) -> int:
        return sum(len(h.boxes) for h in self.holdout)


class ImageCache:
    """Downloaded image bytes on disk, keyed by a hash of the task's image URL.

    Only bytes that decoded are stored, written under a temporary name and renamed, so a crash or a
    concurrent run never leaves a partial file behind a key.
    """

    def __init__(self, root: Path):
        self.root = Path(root)

    def path(self, url: str) -> Path:
        return self.root / hashlib.sha256(url.encode()).hexdigest()

    def get(self, url: str) -> bytes | None:
        try:
            return self.path(url).read_bytes()
        except OSError:
            return None

    def put(self, url: str, data: bytes) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".part-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, self.path(url))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


@dataclass
class _Fetched:
    data: bytes | None = None
    error: str | None = None
    cached: bool = False


def _fetch(url: str, cache: ImageCache, download: Callable[[str], bytes], max_pixels: int) -> _Fetched:
    data = cache.get(url)
    if data is not None:
        return _Fetched(data, cached=True)
    try:
        data = download(url)
        decode_image(data, max_pixels)  # only cache what decodes
    except ImageError as e:
        return _Fetched(error=str(e))
    except Exception as e:  # one broken download must not stop the dataset
        log.exception("image fetch failed", extra={"url": url[:120]})
        return _Fetched(error=f"unexpected error: {type(e).__name__}")
    cache.put(url, data)
    return _Fetched(data)


def _write_image(data: bytes, stem: Path, max_pixels: int) -> tuple[Path, int, int]:
    """Write the image for ultralytics; returns (path, width, height) as annotators saw it.

    The original bytes are kept when ultralytics reads the format and no EXIF rotation applies (lossless
    and cheap); anything else is written as the decoded, upright PNG.
    """
    arr = decode_image(data, max_pixels)  # BGR, EXIF rotation applied; raises ImageError
    height, width = arr.shape[:2]
    with Image.open(io.BytesIO(data)) as im:
        fmt = im.format or ""
        orientation = im.getexif().get(_EXIF_ORIENTATION, 1)
    if fmt in _DIRECT_FORMATS and orientation in (0, 1):
        path = stem.with_suffix(_DIRECT_FORMATS[fmt])
        path.write_bytes(data)
    else:
        path = stem.with_suffix(".png")
        Image.fromarray(np.ascontiguousarray(arr[..., ::-1])).save(path)
    return path, width, height


def build_dataset(
    export: ProjectExport,
    root: Path,
    *,
    holdout_fraction: float,
    download: Callable[[str], bytes],
    cache: ImageCache,
    max_pixels: int,
    workers: int = 8,
    chunk: int = 64,
) -> Dataset:
    """Write ``root/images/{train,val}``, ``root/labels/{train,val}`` and ``root/data.yaml``.

    Classes are the RectangleLabels labels in config order. ``download(url) -> bytes`` fetches one image
    (``ImageFetcher.download``: the token goes only to Label Studio). Images are fetched ``chunk`` at a
    time, so memory holds at most one chunk of encoded images.
    """
    control = detection_control(export.label_config)
    classes = tuple(control.labels)
    root = Path(root).resolve()
    for side in SPLIT_DIRS.values():
        (root / "images" / side).mkdir(parents=True, exist_ok=True)
        (root / "labels" / side).mkdir(parents=True, exist_ok=True)
    report = DatasetReport(
        tasks_exported=len(export.tasks),
        export_skipped=dict(export.skipped),
        project_stats=dict(export.project_stats),
    )
    train_ids: list[int] = []
    holdout_ids: list[int] = []
    holdout: list[LabeledImage] = []
    train: list[LabeledImage] = []
    per_class: Counter[str] = Counter()

    usable: list[tuple[LabeledTask, str]] = []
    for task in export.tasks:
        url = task.data.get(control.data_key)
        if not isinstance(url, str) or not url.strip():
            report.tasks_without_image += 1
            continue
        usable.append((task, url))

    with ThreadPoolExecutor(max(1, workers), thread_name_prefix="dataset-fetch") as pool:
        for start in range(0, len(usable), chunk):
            part = usable[start : start + chunk]
            fetched = list(pool.map(lambda tu: _fetch(tu[1], cache, download, max_pixels), part))
            for (task, _url), got in zip(part, fetched, strict=True):
                key = str(task.task_id)
                if got.data is None:
                    report.unreadable_images[key] = got.error or "unknown error"
                    continue
                side = split_of(task.task_id, holdout_fraction)
                stem = root / "images" / SPLIT_DIRS[side] / key
                try:
                    image_path, width, height = _write_image(got.data, stem, max_pixels)
                except ImageError as e:
                    report.unreadable_images[key] = str(e)
                    continue
                if got.cached:
                    report.images_from_cache += 1
                else:
                    report.images_downloaded += 1
                boxes = convert_result(task.result, control, classes, width, height, report)
                (root / "labels" / SPLIT_DIRS[side] / f"{key}.txt").write_text(label_text(boxes))
                per_class.update(classes[b.cls] for b in boxes)
                report.boxes += len(boxes)
                report.negative_images += not boxes
                item = LabeledImage(task.task_id, image_path, width, height, tuple(boxes))
                if side == "holdout":
                    holdout_ids.append(task.task_id)
                    holdout.append(item)
                else:
                    train_ids.append(task.task_id)
                    train.append(item)

    report.tasks_used = len(train_ids) + len(holdout_ids)
    report.train_tasks, report.holdout_tasks = len(train_ids), len(holdout_ids)
    report.boxes_per_class = {name: per_class.get(name, 0) for name in classes}
    # ultralytics needs a non-empty "val" to start; with no held-out image it validates on train images,
    # which only affects its own log line: our evaluation reads the held-out list, which is then empty.
    val_dir = "images/val" if holdout else "images/train"
    names = "".join(f"  {i}: {_yaml_str(n)}\n" for i, n in enumerate(classes))
    data_yaml = root / "data.yaml"
    data_yaml.write_text(
        f"path: {_yaml_str(str(root))}\ntrain: images/train\nval: {val_dir}\nnames:\n{names}"
    )
    return Dataset(root, data_yaml, classes, control, train_ids, holdout_ids, holdout, report, train)


def _yaml_str(s: str) -> str:
    """A YAML double-quoted scalar (JSON strings are valid YAML), safe for any label text."""
    return json.dumps(s)
