"""The demo's built-in image set: shapes on textured backgrounds, one class rare, some near-duplicates,
and a "night shift": a share of the scenes dark, low-contrast and noisy.

Written as a Pascal VOC folder so the demo imports it exactly as a user's own dataset would be imported
(`annoloop import --format voc`). The rare class (triangles, ~6% of shapes) and the near-duplicates (a few
images repeated with a small shift and noise) are what the ranking's class-balance and diversity terms
are there for. The night scenes are why the demo has something to learn: the default (starter) model was
trained on clean daylight shapes only, so it is good on half of the set and poor on the other half, which
is the situation of a real project whose camera or site differs from the data a model was trained on.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from training.synthetic import CLASSES, _draw_scene

CLASS_WEIGHTS = (0.47, 0.47, 0.06)  # circle, square, triangle (rare)


def night_shift(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Darker, lower contrast, a blue cast and strong sensor noise: the same camera at night."""
    arr = rgb.astype(np.float32) * rng.uniform(0.15, 0.25) + np.array([0.0, 4.0, 14.0], np.float32)
    arr += rng.normal(0.0, 28.0, size=arr.shape).astype(np.float32)
    return np.clip(arr, 0, 255).astype(np.uint8)


def write_demo_dataset(
    root: Path,
    n: int = 240,
    seed: int = 0,
    width: int = 320,
    height: int = 240,
    night_share: float = 0.5,
) -> Path:
    """``root/Annotations`` + ``root/JPEGImages``: ``n`` images, a tenth of them near-copies of others,
    ``night_share`` of the scenes at night (file names say which: ``shapes-night-…``)."""
    rng = np.random.default_rng(seed)
    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    (root / "JPEGImages").mkdir(exist_ok=True)
    originals: list[tuple[np.ndarray, list, bool]] = []
    for i in range(n):
        if originals and rng.random() < 0.1:  # a near-duplicate: same scene, shifted a little, new noise
            rgb, shapes, night = originals[int(rng.integers(len(originals)))]
            dx, dy = (int(v) for v in rng.integers(-3, 4, size=2))
            rgb = np.roll(rgb, (dy, dx), axis=(0, 1)).astype(np.int16) + rng.integers(-6, 7, rgb.shape)
            rgb = np.clip(rgb, 0, 255).astype(np.uint8)
            boxes = [(s.cls, *_shift(s.box, dx, dy, width, height)) for s in shapes]
        else:
            classes = [
                int(c) for c in rng.choice(len(CLASSES), size=int(rng.integers(1, 4)), p=CLASS_WEIGHTS)
            ]
            rgb, shapes = _draw_scene(rng, width, height, classes)
            night = bool(rng.random() < night_share)
            if night:
                rgb = night_shift(rgb, rng)
            originals.append((rgb, shapes, night))
            boxes = [(s.cls, *s.box) for s in shapes]
        name = f"shapes-night-{i:04d}" if night else f"shapes-{i:04d}"
        Image.fromarray(rgb).save(root / "JPEGImages" / f"{name}.jpg", quality=92)
        objects = "".join(
            f"<object><name>{CLASSES[c]}</name><bndbox><xmin>{x0:.1f}</xmin><ymin>{y0:.1f}</ymin>"
            f"<xmax>{x1:.1f}</xmax><ymax>{y1:.1f}</ymax></bndbox></object>"
            for c, x0, y0, x1, y1 in boxes
        )
        (root / "Annotations" / f"{name}.xml").write_text(
            f"<annotation><filename>{name}.jpg</filename><size><width>{width}</width><height>{height}</height>"
            f"</size>{objects}</annotation>"
        )
    return root


def _shift(box: tuple[float, float, float, float], dx: int, dy: int, w: int, h: int) -> tuple[float, ...]:
    x0, y0, x1, y1 = box
    return (
        min(max(x0 + dx, 0), w),
        min(max(y0 + dy, 0), h),
        min(max(x1 + dx, 0), w),
        min(max(y1 + dy, 0), h),
    )
