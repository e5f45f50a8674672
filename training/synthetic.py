"""Synthetic scenes of simple shapes, and YOLO-format datasets built from them.

Why this exists: the test-suite and ``make demo`` need images with known ground truth and a model that
really detects something, on a machine without network access (no COCO, no pretrained weights). Three
filled shapes on a noisy background are learnable by a from-scratch ``yolo11n`` in a couple of CPU
minutes, and since we draw them we know their exact boxes and polygons.

Only numpy and Pillow are used, so the generator is cheap to import from tests and fixtures. Everything
is deterministic given the seed / ``np.random.Generator`` passed in.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

CLASSES: tuple[str, ...] = ("circle", "square", "triangle")

#: Vertices used to approximate a circle; enough that its polygon reads as round, few enough for labels.
CIRCLE_VERTICES = 24

#: Shape size (circle diameter, square side, triangle circumscribed diameter) as a fraction of the image's
#: short side. Below ~12% a shape at imgsz 128-160 is only a dozen pixels, hard for a tiny model.
MIN_SIZE_FRAC = 0.12
MAX_SIZE_FRAC = 0.40

#: Aspect ratios (width / height) of dataset images, so that a model trained on them is used to the
#: letterboxing of the 4:3 camera-like frames the demo and tests feed it.
_ASPECTS = (1.0, 4 / 3, 3 / 4)

#: Base colour per class (RGB). Colour correlates with class to speed up learning, but is jittered and
#: sometimes (``_RANDOM_COLOUR_P``) fully random, so that the shape stays the decisive cue.
_CLASS_COLOURS = ((220, 60, 50), (60, 190, 70), (240, 200, 40))
_COLOUR_JITTER = 45
_RANDOM_COLOUR_P = 0.25

_IMAGE_EXT = ".jpg"


@dataclass(frozen=True)
class Shape:
    """One drawn shape: its class index into :data:`CLASSES` and its outline in pixel coordinates."""

    cls: int
    polygon: list[tuple[float, float]]

    @property
    def box(self) -> tuple[float, float, float, float]:
        """Axis-aligned bounding box ``(x0, y0, x1, y1)`` in pixels, the tightest one around the polygon."""
        xs = [p[0] for p in self.polygon]
        ys = [p[1] for p in self.polygon]
        return (min(xs), min(ys), max(xs), max(ys))


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A muted, blotchy, noisy background: texture forces the model to learn edges, not 'non-grey = object'."""
    # A greyish base with a slight tint: saturated shapes should stand out by colour *and* edges.
    base = rng.uniform(60, 170) + rng.uniform(-15, 15, size=3)
    # Low-frequency blotches (mostly brightness, a little colour): a coarse random grid upsampled smoothly.
    # The grid scales with the image so the texture looks the same after the model's resize.
    gw, gh = max(2, width // 24), max(2, height // 24)
    coarse = rng.normal(0.0, 18.0, size=(gh, gw, 1)) + rng.normal(0.0, 6.0, size=(gh, gw, 3)) + base
    coarse_img = Image.fromarray(np.clip(coarse, 0, 255).astype(np.uint8), "RGB")
    smooth = np.asarray(coarse_img.resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32)
    # A linear gradient, as from uneven lighting.
    gx, gy = rng.uniform(-30, 30, size=2)
    ramp = (np.linspace(-0.5, 0.5, width)[None, :] * gx + np.linspace(-0.5, 0.5, height)[:, None] * gy)[
        ..., None
    ]
    noise = rng.normal(0.0, 6.0, size=(height, width, 3))
    return np.clip(smooth + ramp + noise, 0, 255).astype(np.uint8)


def _polygon(cls: int, cx: float, cy: float, radius: float, angle: float) -> list[tuple[float, float]]:
    """Outline of a shape of class ``cls`` centred on (cx, cy), fitting in a circle of ``radius``."""
    if CLASSES[cls] == "circle":
        n, angle = CIRCLE_VERTICES, 0.0
    else:
        n = 4 if CLASSES[cls] == "square" else 3
    return [
        (
            cx + radius * math.cos(angle + 2 * math.pi * k / n),
            cy + radius * math.sin(angle + 2 * math.pi * k / n),
        )
        for k in range(n)
    ]


def _shape_radius(cls: int, size: float) -> float:
    """Circumradius for a shape whose characteristic size (diameter / side) is ``size`` pixels."""
    name = CLASSES[cls]
    if name == "square":
        return size / math.sqrt(2)  # side = size
    return size / 2  # circle diameter, triangle circumscribed diameter


def _colour(rng: np.random.Generator, cls: int) -> tuple[int, int, int]:
    """Fill colour: class base colour plus jitter, or sometimes any saturated colour."""
    if rng.random() < _RANDOM_COLOUR_P:
        rgb = rng.uniform(0, 255, size=3)
        rgb[rng.integers(3)] = rng.uniform(200, 255)  # keep it bright enough to stand out
    else:
        rgb = np.asarray(_CLASS_COLOURS[cls], dtype=np.float64) + rng.uniform(
            -_COLOUR_JITTER, _COLOUR_JITTER, size=3
        )
    r, g, b = (int(v) for v in np.clip(rgb, 0, 255))
    return (r, g, b)


def _draw_scene(
    rng: np.random.Generator, width: int, height: int, classes: Sequence[int]
) -> tuple[np.ndarray, list[Shape]]:
    """Render the given classes (as many as fit without overlap, at least the first) on a fresh background."""
    img = Image.fromarray(_background(rng, width, height), "RGB")
    draw = ImageDraw.Draw(img)
    short = min(width, height)
    placed: list[tuple[float, float, float]] = []  # (cx, cy, radius) of drawn shapes
    shapes: list[Shape] = []
    for i, cls in enumerate(classes):
        for _attempt in range(50):
            size = rng.uniform(MIN_SIZE_FRAC, MAX_SIZE_FRAC) * short
            if i == 0 and _attempt > 25:
                size = MIN_SIZE_FRAC * short  # guarantee at least one shape, whatever the image size
            radius = _shape_radius(cls, size)
            margin = radius + 1.0
            if 2 * margin >= width or 2 * margin >= height:
                continue
            cx = rng.uniform(margin, width - margin)
            cy = rng.uniform(margin, height - margin)
            # Circumscribed circles 4 px apart guarantee the shapes (and their boxes, mostly) do not touch.
            if any(math.hypot(cx - px, cy - py) < radius + pr + 4 for px, py, pr in placed):
                continue
            # Triangles point roughly up; squares are tilted only a little, so they do not become diamonds.
            angle = rng.uniform(-math.pi / 2 - 0.35, -math.pi / 2 + 0.35)
            if CLASSES[cls] == "square":
                angle = math.pi / 4 + rng.uniform(-0.25, 0.25)
            poly = _polygon(cls, cx, cy, radius, angle)
            draw.polygon(poly, fill=_colour(rng, cls))
            placed.append((cx, cy, radius))
            shapes.append(Shape(cls=cls, polygon=[(float(x), float(y)) for x, y in poly]))
            break
    if not shapes:
        raise ValueError(f"image {width}x{height} is too small to hold a shape")
    # A slight blur softens the aliased polygon edges, like a camera would.
    img = img.filter(ImageFilter.GaussianBlur(radius=0.6))
    return np.asarray(img, dtype=np.uint8).copy(), shapes


def render_scene(
    rng: np.random.Generator, width: int, height: int, max_shapes: int = 3
) -> tuple[np.ndarray, list[Shape]]:
    """Render an RGB ``(height, width, 3)`` uint8 scene with 1..max_shapes non-overlapping shapes.

    Shapes that cannot be placed without overlap after a few tries are dropped, so the count can be below
    the drawn target on small images; there is always at least one.

    The array is RGB (as Pillow and Label Studio see images). ultralytics takes numpy inputs as BGR (the
    starter models are trained on files, which it reads with OpenCV), so pass ``img[..., ::-1]`` to
    ``model.predict``; colour is a secondary cue for the class and swapped channels cost accuracy.
    """
    if max_shapes < 1:
        raise ValueError("max_shapes must be >= 1")
    n = int(rng.integers(1, max_shapes + 1))
    classes = [int(c) for c in rng.integers(0, len(CLASSES), size=n)]
    return _draw_scene(rng, width, height, classes)


def _image_size(rng: np.random.Generator, imgsz: int) -> tuple[int, int]:
    """(width, height) with long side ``imgsz`` and a random aspect from :data:`_ASPECTS`."""
    aspect = _ASPECTS[int(rng.integers(len(_ASPECTS)))]
    if aspect >= 1:
        return imgsz, round(imgsz / aspect)
    return round(imgsz * aspect), imgsz


def _fmt(v: float) -> str:
    return f"{min(max(v, 0.0), 1.0):.6f}"


def yolo_label_line(shape: Shape, width: int, height: int, task: Literal["detect", "segment"]) -> str:
    """One YOLO label line for ``shape``: ``cls cx cy w h`` (detect) or ``cls x1 y1 x2 y2 ...`` (segment)."""
    if task == "detect":
        x0, y0, x1, y1 = shape.box
        vals = [(x0 + x1) / 2 / width, (y0 + y1) / 2 / height, (x1 - x0) / width, (y1 - y0) / height]
    else:
        vals = [c for x, y in shape.polygon for c in (x / width, y / height)]
    return " ".join([str(shape.cls), *(_fmt(v) for v in vals)])


def _write_image(arr: np.ndarray, path: Path) -> None:
    Image.fromarray(arr, "RGB").save(path, quality=92)


def write_yolo_dataset(
    out_dir: Path,
    task: Literal["detect", "segment", "classify"],
    n_train: int,
    n_val: int,
    imgsz: int,
    seed: int,
    *,
    max_shapes: int = 4,
) -> Path:
    """Write a YOLO-format dataset under ``out_dir`` (replacing what was there) and return what to train on.

    detect/segment: ``images/{train,val}/*.jpg`` + ``labels/{train,val}/*.txt`` and a ``data.yaml`` with
    an absolute ``path``; returns the ``data.yaml`` path. classify: ``{train,val}/<class>/*.jpg`` with one
    shape per image and classes balanced; returns the root folder (what ultralytics' classifier wants).

    Train and val use independent random streams derived from ``seed``, so the val set does not change
    when ``n_train`` does, and the result is byte-identical for the same arguments.
    """
    out_dir = Path(out_dir).resolve()
    if task not in ("detect", "segment", "classify"):
        raise ValueError(f"unknown task {task!r}")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    for split_idx, (split, n) in enumerate((("train", n_train), ("val", n_val))):
        rng = np.random.default_rng([seed, split_idx])
        if task == "classify":
            for name in CLASSES:
                (out_dir / split / name).mkdir(parents=True)
            for i in range(n):
                cls = i % len(CLASSES)
                # Square images: the classifier centre-crops, a 4:3 frame would lose its sides.
                arr, _ = _draw_scene(rng, imgsz, imgsz, [cls])
                _write_image(arr, out_dir / split / CLASSES[cls] / f"{split}_{i:05d}{_IMAGE_EXT}")
            continue
        img_dir, lbl_dir = out_dir / "images" / split, out_dir / "labels" / split
        img_dir.mkdir(parents=True)
        lbl_dir.mkdir(parents=True)
        for i in range(n):
            w, h = _image_size(rng, imgsz)
            arr, shapes = render_scene(rng, w, h, max_shapes=max_shapes)
            stem = f"{split}_{i:05d}"
            _write_image(arr, img_dir / f"{stem}{_IMAGE_EXT}")
            lines = [yolo_label_line(s, w, h, task) for s in shapes]
            (lbl_dir / f"{stem}.txt").write_text("\n".join(lines) + "\n")
    if task == "classify":
        return out_dir
    names = "\n".join(f"  {i}: {name}" for i, name in enumerate(CLASSES))
    yaml_path = out_dir / "data.yaml"
    yaml_path.write_text(
        f"# Synthetic shapes dataset (annoloop training/synthetic.py), seed={seed}, imgsz={imgsz}\n"
        f"path: {json.dumps(str(out_dir))}\ntrain: images/train\nval: images/val\nnames:\n{names}\n"
    )
    return yaml_path
