"""The demo's built-in image set: shapes on textured backgrounds, one class rare, some near-duplicates.

Written as a Pascal VOC folder so the demo imports it exactly as a user's own dataset would be imported
(`annoloop import --format voc`). The rare class (triangles, ~6% of shapes) and the near-duplicates (a few
images repeated with a small shift and noise) are what the ranking's class-balance and diversity terms
are there for.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from training.synthetic import CLASSES, _draw_scene

CLASS_WEIGHTS = (0.47, 0.47, 0.06)  # circle, square, triangle (rare)


def write_demo_dataset(root: Path, n: int = 240, seed: int = 0, width: int = 320, height: int = 240) -> Path:
    """``root/Annotations`` + ``root/JPEGImages``: ``n`` images, a tenth of them near-copies of others."""
    rng = np.random.default_rng(seed)
    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    (root / "JPEGImages").mkdir(exist_ok=True)
    originals: list[tuple[np.ndarray, list]] = []
    for i in range(n):
        if originals and rng.random() < 0.1:  # a near-duplicate: same scene, shifted a little, new noise
            rgb, shapes = originals[int(rng.integers(len(originals)))]
            dx, dy = (int(v) for v in rng.integers(-3, 4, size=2))
            rgb = np.roll(rgb, (dy, dx), axis=(0, 1)).astype(np.int16) + rng.integers(-6, 7, rgb.shape)
            rgb = np.clip(rgb, 0, 255).astype(np.uint8)
            boxes = [(s.cls, *_shift(s.box, dx, dy, width, height)) for s in shapes]
        else:
            classes = [
                int(c) for c in rng.choice(len(CLASSES), size=int(rng.integers(1, 4)), p=CLASS_WEIGHTS)
            ]
            rgb, shapes = _draw_scene(rng, width, height, classes)
            originals.append((rgb, shapes))
            boxes = [(s.cls, *s.box) for s in shapes]
        name = f"shapes-{i:04d}"
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
