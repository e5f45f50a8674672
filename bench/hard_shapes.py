"""A generated detection benchmark built to stress what an active-learning ranking is for.

``training/synthetic.py`` draws easy, balanced, independent scenes: on those every ranking looks like random.
This generator keeps its idea (filled shapes on a textured background, exact boxes) but adds the four
things that make the choice of images matter in real projects:

- **class imbalance with a rare class**: ``star`` appears in only ``rare_share_pool`` of the pool scenes
  (one star each), so a random batch often holds none, while the test set holds many (its AP counts as
  much as any other class's in mAP);
- **near-duplicates**: ``burst_share`` of the pool comes in bursts of 4-8 frames of one scene with small
  jitter and fresh noise (a video, a camera burst): pure uncertainty sampling takes a whole burst at once;
- **clutter**: unlabeled distractors (outlines, lines, dots, hexagons) that a weak model calls objects,
  so false boxes are an error source, not only misses;
- **a shifted domain**: darker, noisier frames (``shifted_share_pool`` of the pool, so rare in a small
  random initial set) that are a third of the test set.

Colours are random, not tied to the class, so shape is the only cue. Deterministic for a seed; only numpy
and Pillow. The test set uses an independent random stream, so it does not change with the pool size.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "star")
RARE_CLASS = "star"
_COMMON = (0, 1, 2)
_STAR = 3
_IMAGE_EXT = ".jpg"


@dataclass(frozen=True)
class HardShapesSpec:
    """Sizes and shares of the generated benchmark (defaults: the full benchmark's pool of 600)."""

    n_pool: int = 600
    n_test: int = 200
    width: int = 160
    height: int = 120
    #: Share of pool *scenes* with one star (bursts repeat it); the test set gets many more.
    rare_share_pool: float = 0.05
    rare_share_test: float = 0.25
    #: Share of pool scenes in the dark, noisy domain; rare in a small random initial set by construction.
    shifted_share_pool: float = 0.12
    shifted_share_test: float = 0.33
    #: Share of pool images that belong to bursts of near-identical frames, and the burst lengths.
    burst_share: float = 0.4
    burst_min: int = 4
    burst_max: int = 8
    clutter_share: float = 0.6
    max_objects: int = 4
    min_size_frac: float = 0.16
    max_size_frac: float = 0.36

    def key(self, seed: int) -> str:
        """Short hash naming the generated folder: changes whenever the spec, the seed or the code does."""
        payload = json.dumps({**asdict(self), "seed": seed, "v": 2}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]


@dataclass
class GeneratedImage:
    """One benchmark image with its ground truth (pixel xyxy boxes, class indices) and what it stresses.

    The simulation (`bench/al_sim.py`) uses this same type for BCCD images (as ``Item``)."""

    name: str
    path: Path
    width: int
    height: int
    boxes: np.ndarray
    classes: np.ndarray
    tags: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Obj:
    cls: int
    cx: float
    cy: float
    radius: float
    angle: float
    colour: tuple[int, int, int]


@dataclass
class _Distractor:
    kind: str
    params: list[float]
    colour: tuple[int, int, int]


@dataclass
class _Scene:
    objects: list[_Obj]
    distractors: list[_Distractor]
    shifted: bool
    background_seed: int


def _polygon(cls: int, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if cls == 0:
        n, a0, radii = 24, 0.0, [r]
    elif cls == 1:
        n, a0, radii = 4, angle, [r]
    elif cls == 2:
        n, a0, radii = 3, angle, [r]
    else:  # five-pointed star: alternating outer and inner radius
        n, a0, radii = 10, angle, [r, 0.45 * r]
    return [
        (
            cx + radii[k % len(radii)] * math.cos(a0 + 2 * math.pi * k / n),
            cy + radii[k % len(radii)] * math.sin(a0 + 2 * math.pi * k / n),
        )
        for k in range(n)
    ]


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    rgb = rng.uniform(0, 255, size=3)
    rgb[rng.integers(3)] = rng.uniform(190, 255)  # bright enough to stand out from the background
    r, g, b = (int(v) for v in rgb)
    return (r, g, b)


def _background(seed: int, width: int, height: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.uniform(70, 170) + rng.uniform(-15, 15, size=3)
    gw, gh = max(2, width // 20), max(2, height // 20)
    coarse = rng.normal(0.0, 20.0, size=(gh, gw, 1)) + rng.normal(0.0, 7.0, size=(gh, gw, 3)) + base
    img = Image.fromarray(np.clip(coarse, 0, 255).astype(np.uint8), "RGB")
    return np.asarray(img.resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32)


def _plan_scene(rng: np.random.Generator, spec: HardShapesSpec, rare: bool, shifted: bool) -> _Scene:
    """Where everything goes; rendering adds the per-frame jitter and noise."""
    short = min(spec.width, spec.height)
    classes = [int(rng.choice(_COMMON)) for _ in range(int(rng.integers(1, spec.max_objects + 1)))]
    if rare:
        classes[0] = _STAR  # the star is placed first, so it always fits
    placed: list[_Obj] = []
    for cls in classes:
        for _ in range(40):
            size = rng.uniform(spec.min_size_frac, spec.max_size_frac) * short
            r = size / math.sqrt(2) if cls == 1 else size / 2
            m = r + 4.0
            if 2 * m >= spec.width or 2 * m >= spec.height:
                continue
            cx, cy = rng.uniform(m, spec.width - m), rng.uniform(m, spec.height - m)
            if any(math.hypot(cx - o.cx, cy - o.cy) < r + o.radius + 4 for o in placed):
                continue
            angle = -math.pi / 2 + rng.uniform(-0.4, 0.4)
            if cls == 1:
                angle = math.pi / 4 + rng.uniform(-0.3, 0.3)
            placed.append(_Obj(cls, cx, cy, r, angle, _colour(rng)))
            break
    distractors: list[_Distractor] = []
    if rng.random() < spec.clutter_share:
        for _ in range(int(rng.integers(2, 7))):
            kind = str(rng.choice(["line", "outline", "dot", "hexagon"]))
            x, y = rng.uniform(0, spec.width), rng.uniform(0, spec.height)
            s = rng.uniform(0.05, 0.22) * short
            distractors.append(_Distractor(kind, [x, y, s, rng.uniform(0, math.pi)], _colour(rng)))
    return _Scene(placed, distractors, shifted, int(rng.integers(2**31)))


def _render(
    scene: _Scene, spec: HardShapesSpec, rng: np.random.Generator, jitter: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """RGB image, (n, 4) xyxy boxes and (n,) classes of one frame of ``scene``."""
    w, h = spec.width, spec.height
    img = Image.fromarray(np.clip(_background(scene.background_seed, w, h), 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    dx, dy = rng.uniform(-jitter, jitter, size=2) if jitter else (0.0, 0.0)
    for d in scene.distractors:
        x, y, s, a = d.params
        x, y = x + dx, y + dy
        if d.kind == "line":
            draw.line([(x, y), (x + s * 2 * math.cos(a), y + s * 2 * math.sin(a))], fill=d.colour, width=2)
        elif d.kind == "outline":
            draw.ellipse([x - s, y - s * 0.6, x + s, y + s * 0.6], outline=d.colour, width=2)
        elif d.kind == "dot":
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=d.colour)
        else:  # a filled hexagon: shaped like an object, but not one of the classes
            pts = [
                (x + s * math.cos(a + k * math.pi / 3), y + s * math.sin(a + k * math.pi / 3))
                for k in range(6)
            ]
            draw.polygon(pts, fill=d.colour)
    boxes, classes = [], []
    for o in scene.objects:
        poly = _polygon(o.cls, o.cx + dx, o.cy + dy, o.radius, o.angle)
        draw.polygon(poly, fill=o.colour)
        xs, ys = [p[0] for p in poly], [p[1] for p in poly]
        boxes.append([max(0.0, min(xs)), max(0.0, min(ys)), min(float(w), max(xs)), min(float(h), max(ys))])
        classes.append(o.cls)
    img = img.filter(ImageFilter.GaussianBlur(radius=0.6))
    arr = np.asarray(img, dtype=np.float32)
    if scene.shifted:
        # Darker, lower contrast, a colour cast and strong sensor noise: a night shift of the same camera.
        arr = (
            arr * rng.uniform(0.28, 0.4) + np.array([0.0, 4.0, 12.0]) + rng.normal(0.0, 16.0, size=arr.shape)
        )
    else:
        arr = arr + rng.normal(0.0, 5.0, size=arr.shape)
    out = np.clip(arr, 0, 255).astype(np.uint8)
    return out, np.asarray(boxes, dtype=np.float64).reshape(-1, 4), np.asarray(classes, dtype=int)


def _write(arr: np.ndarray, path: Path) -> None:
    Image.fromarray(arr, "RGB").save(path, quality=92)


def generate(
    root: Path, spec: HardShapesSpec, seed: int = 0
) -> tuple[list[GeneratedImage], list[GeneratedImage]]:
    """Write (or reuse) the benchmark under ``root``; return (pool, test) images with ground truth.

    The folder is named by :meth:`HardShapesSpec.key`, and a ``manifest.json`` written last marks it
    complete, so a re-run reuses it and a crashed run regenerates it.
    """
    folder = Path(root) / f"hard_shapes-{spec.key(seed)}"
    manifest = folder / "manifest.json"
    if manifest.is_file():
        return _read_manifest(manifest)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    pool: list[GeneratedImage] = []
    rng = np.random.default_rng([seed, 0])
    group = 0
    # Per-scene burst probability that makes ``burst_share`` of the *images* burst frames (mean length m).
    m = (spec.burst_min + spec.burst_max) / 2
    p_burst = (
        spec.burst_share / (m * (1 - spec.burst_share) + spec.burst_share) if spec.burst_share < 1 else 1.0
    )
    while len(pool) < spec.n_pool:
        burst = rng.random() < p_burst
        size = int(rng.integers(spec.burst_min, spec.burst_max + 1)) if burst else 1
        size = min(size, spec.n_pool - len(pool))
        # Shares are per scene: a burst is all rare or not, all shifted or not.
        scene = _plan_scene(
            rng, spec, rng.random() < spec.rare_share_pool, rng.random() < spec.shifted_share_pool
        )
        for k in range(size):
            arr, boxes, classes = _render(scene, spec, rng, jitter=3.0 if size > 1 else 0.0)
            name = f"pool_{len(pool):05d}"
            _write(arr, folder / "images" / f"{name}{_IMAGE_EXT}")
            tags = {"group": group, "burst": size > 1, "frame": k, "shifted": scene.shifted}
            pool.append(
                GeneratedImage(
                    name,
                    folder / "images" / f"{name}{_IMAGE_EXT}",
                    spec.width,
                    spec.height,
                    boxes,
                    classes,
                    tags,
                )
            )
        group += 1
    test: list[GeneratedImage] = []
    trng = np.random.default_rng([seed, 1])
    for i in range(spec.n_test):
        scene = _plan_scene(
            trng, spec, trng.random() < spec.rare_share_test, trng.random() < spec.shifted_share_test
        )
        arr, boxes, classes = _render(scene, spec, trng, jitter=0.0)
        name = f"test_{i:05d}"
        _write(arr, folder / "images" / f"{name}{_IMAGE_EXT}")
        tags = {"group": -1 - i, "burst": False, "frame": 0, "shifted": scene.shifted}
        test.append(
            GeneratedImage(
                name, folder / "images" / f"{name}{_IMAGE_EXT}", spec.width, spec.height, boxes, classes, tags
            )
        )
    payload = {
        "spec": asdict(spec),
        "seed": seed,
        "pool": [_item_json(g) for g in pool],
        "test": [_item_json(g) for g in test],
    }
    tmp = manifest.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload))
    tmp.replace(manifest)
    return pool, test


def _item_json(g: GeneratedImage) -> dict[str, Any]:
    return {
        "name": g.name,
        "file": g.path.name,
        "width": g.width,
        "height": g.height,
        "boxes": g.boxes.round(3).tolist(),
        "classes": g.classes.tolist(),
        "tags": g.tags,
    }


def _read_manifest(manifest: Path) -> tuple[list[GeneratedImage], list[GeneratedImage]]:
    data = json.loads(manifest.read_text())
    images = manifest.parent / "images"

    def load(rows: list[dict[str, Any]]) -> list[GeneratedImage]:
        return [
            GeneratedImage(
                r["name"],
                images / r["file"],
                int(r["width"]),
                int(r["height"]),
                np.asarray(r["boxes"], dtype=np.float64).reshape(-1, 4),
                np.asarray(r["classes"], dtype=int),
                dict(r["tags"]),
            )
            for r in rows
        ]

    return load(data["pool"]), load(data["test"])
