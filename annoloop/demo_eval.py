"""The demo's learning curve: each served model scored on a fixed test set nobody labels.

Why not the training history's held-out score alone: a project holds out 20% of what it labeled, so after a
round of 20 labels that is about four tasks, whose mAP50 is 0.99 or 0.5 by chance, and the set changes every
round. The demo knows the truth of a separate test set (the built-in set's extra scenes, or a dataset's own
``test`` split, which is not imported), so it can show what a person would want to see: the same images, scored
after every round, for the whole set and per group (the built-in set's day and night scenes).

Scoring is ultralytics' own validation (``YOLO.val``) on the evaluation set the training job writes
(``training.evaluate.write_eval_set``), per model, with labels in that model's class order (a project's model
and the default model may order classes differently).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from annoloop.datasets import LabeledImage
from training.dataset import LabeledImage as EvalImage
from training.dataset import YoloBox
from training.evaluate import write_eval_set

Groups = Mapping[str, Callable[[LabeledImage], bool]]


@dataclass(frozen=True)
class TestScore:
    """mAP of one model on the test set (and per group); None where the group has no image."""

    version: str
    labels: int
    map50: dict[str, float | None]
    map50_95: dict[str, float | None]

    def line(self) -> str:
        parts = [f"{g} {v:.3f}" for g, v in self.map50.items() if g != "all" and v is not None]
        extra = f" ({', '.join(parts)})" if parts else ""
        return f"test mAP50 {self.map50['all']:.3f}{extra}"


def _eval_items(images: Sequence[LabeledImage], names: Sequence[str]) -> list[EvalImage]:
    """The images as the evaluation code takes them: YOLO boxes indexed like ``names`` (the model's classes);
    a box of a class the model does not know is left out and so counts as missed."""
    index = {n: i for i, n in enumerate(names)}
    out = []
    for k, im in enumerate(images):
        boxes = tuple(
            YoloBox(
                index[b.label],
                (b.x0 + b.x1) / 2 / im.width,
                (b.y0 + b.y1) / 2 / im.height,
                (b.x1 - b.x0) / im.width,
                (b.y1 - b.y0) / im.height,
            )
            for b in im.boxes
            if b.label in index
        )
        out.append(EvalImage(k, im.path.resolve(), im.width, im.height, boxes))
    return out


def score_model(
    weights: Path,
    version: str,
    labels: int,
    images: Sequence[LabeledImage],
    groups: Groups,
    *,
    imgsz: int,
    workdir: Path,
    device: str = "cpu",
) -> TestScore:
    """Score ``weights`` on ``images``, on all of them and on each group's share."""
    os.environ.setdefault("YOLO_OFFLINE", "1")
    from ultralytics import YOLO
    from ultralytics.utils import LOGGER

    names = [str(n) for _, n in sorted(YOLO(str(weights)).names.items())]
    m50: dict[str, float | None] = {}
    m5095: dict[str, float | None] = {}
    if not {b.label for im in images for b in im.boxes} & set(names):
        # A model of other classes (the default model on a dataset of its own) finds nothing to score.
        zero = {g: 0.0 for g in ("all", *groups)}
        return TestScore(version, labels, zero, dict(zero))
    for group, keep in {"all": lambda _: True, **groups}.items():
        chosen = [im for im in images if keep(im)]
        if not chosen:
            m50[group] = m5095[group] = None
            continue
        root = workdir / f"{version}-{group}"
        shutil.rmtree(root, ignore_errors=True)
        data = write_eval_set(
            _eval_items(chosen, names),
            {i: i for i in range(len(names))},
            dict(enumerate(names)),
            root / "data",
        )
        model = YOLO(str(weights))  # a fresh model per val: val() keeps state between calls
        level = LOGGER.level
        LOGGER.setLevel(logging.WARNING)  # val() logs its table and speeds; the demo prints one line instead
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                metrics: Any = model.val(
                    data=str(data), imgsz=imgsz, batch=16, device=device, plots=False, verbose=False,
                    project=str(root), name="val", workers=0,
                )  # fmt: skip
        finally:
            LOGGER.setLevel(level)
        m50[group] = float(metrics.box.map50)
        m5095[group] = float(metrics.box.map)
        shutil.rmtree(root, ignore_errors=True)
    return TestScore(version, labels, m50, m5095)


def write_curve(scores: Sequence[TestScore], out: Path, title: str) -> tuple[Path, Path]:
    """Learning curve (labels -> test mAP50 per group) as PNG, and the same numbers as a markdown table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    groups = list(scores[0].map50) if scores else ["all"]
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for g in groups:
        pts = [(s.labels, s.map50[g]) for s in scores if s.map50.get(g) is not None]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=g, linewidth=2.5 if g == "all" else 1.5)
    ax.set_xlabel("labeled tasks")
    ax.set_ylabel("test mAP50")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    png = out / "demo-learning-curve.png"
    fig.savefig(png, dpi=110)
    plt.close(fig)
    head = "| labels | model | " + " | ".join(f"mAP50 {g}" for g in groups) + " | mAP50-95 all |"
    rows = [head, "|---:|---|" + "---:|" * (len(groups) + 1)]
    for s in scores:
        cells = " | ".join("-" if s.map50[g] is None else f"{s.map50[g]:.3f}" for g in groups)
        m = s.map50_95["all"]
        rows.append(f"| {s.labels} | {s.version} | {cells} | {'-' if m is None else f'{m:.3f}'} |")
    md = out / "demo-learning-curve.md"
    md.write_text("\n".join(rows) + "\n")
    return png, md
