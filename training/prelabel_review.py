"""How much annotators changed the pre-labels: the served model's quality on fresh data, per model version.

Why this measure: the held-out split scores a model on tasks labeled before it existed; the pre-labels
annotators corrected since it was served are what it did on data it had never seen, judged by the people
who use it. Label Studio 1.23.2 records which prediction an annotation started from: the annotation's
``parent_prediction`` (the prediction's id; the editor sends it when an annotator submits a task opened
with a pre-label). :mod:`training.export` finds that prediction for each labeled task and hands it here with
the annotation's regions; this module is pure logic over the two region lists.

Each predicted rectangle is matched one-to-one to an annotated rectangle by IoU (greedily, highest IoU
first, any label, at IoU >= ``MATCH_IOU``):

- matched, same label and IoU >= ``KEPT_IOU``: **accepted** (the annotator kept it, perhaps nudged it);
- matched otherwise: **corrected** (``corrected_label``: the label changed; ``corrected_box``: same label,
  box moved or resized beyond ``KEPT_IOU``);
- a predicted region without a match: **rejected** (deleted: a false positive);
- an annotated region without a match: **added** (drawn by the annotator: the model missed it).

Counts are grouped by the model version that made the prediction. Predictions written by the ranking job
carry ``<model version>@<UTC stamp>``, those written by the ML backend the bare ``<model version>``: both
count for that model version (the part before ``@``). Since an annotation can only start from a prediction
that existed, a version's counts only hold annotations made while (or after) it was served.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from training.dataset import rectangle_to_yolo
from training.evaluate import box_iou

#: A predicted and an annotated region are the same object from this IoU on (as in the evaluation).
MATCH_IOU = 0.5
#: A matched region with the same label counts as accepted from this IoU on: annotators nudge boxes by a
#: few pixels without the pre-label having been wrong; moving it further is a correction.
KEPT_IOU = 0.9
OUTCOMES = ("accepted", "corrected", "rejected", "added")


def model_version_of(prediction_version: str) -> str:
    """The model version a prediction's ``model_version`` names: ``v002-...@20261122T103000Z`` -> ``v002-...``."""
    return str(prediction_version).split("@", 1)[0].strip()


@dataclass(frozen=True)
class Box:
    """One rectangle region: its (first) label and its axis-aligned box in image fractions (xyxy)."""

    label: str
    xyxy: tuple[float, float, float, float]


def rectangles(result: Iterable[Mapping[str, Any]], from_name: str | None = None) -> list[Box]:
    """The rectangle regions of a Label Studio result (a prediction's or an annotation's).

    Only ``rectanglelabels`` regions (of ``from_name`` when given) with a label count; a rotated rectangle
    becomes the box around it and a box sticking out of the image is clipped, exactly as for training
    (:func:`training.dataset.rectangle_to_yolo`); regions with no area inside the image are left out.
    """
    boxes: list[Box] = []
    for region in result:
        if region.get("type") != "rectanglelabels":
            continue
        if from_name is not None and region.get("from_name") != from_name:
            continue
        value = region.get("value") or {}
        labels = value.get("rectanglelabels") or []
        if not isinstance(labels, list) or not labels:
            continue
        width = float(region.get("original_width") or 100)
        height = float(region.get("original_height") or 100)
        yolo, _status = rectangle_to_yolo(value, 0, width, height)
        if yolo is not None:
            boxes.append(Box(str(labels[0]), yolo.xyxy()))
    return boxes


@dataclass(frozen=True)
class RegionOutcome:
    """What happened to one region: ``outcome`` is accepted / corrected / rejected / added."""

    outcome: str
    predicted: str | None  # the predicted label (None for an added region)
    annotated: str | None  # the annotated label (None for a rejected region)
    iou: float  # 0 when unmatched
    label_changed: bool = False


def compare(
    predicted: Sequence[Box],
    annotated: Sequence[Box],
    match_iou: float = MATCH_IOU,
    kept_iou: float = KEPT_IOU,
) -> list[RegionOutcome]:
    """One outcome per predicted region (accepted, corrected or rejected) and per unmatched annotated region
    (added). Matching is one-to-one and greedy: pairs at IoU >= ``match_iou`` are taken highest IoU first,
    whatever their labels (a relabeled box is the same object with another label)."""
    out: list[RegionOutcome] = []
    iou = (
        box_iou(np.array([b.xyxy for b in predicted]), np.array([b.xyxy for b in annotated]))
        if predicted and annotated
        else np.zeros((len(predicted), len(annotated)))
    )
    pairs = sorted(
        ((float(iou[i, j]), i, j) for i, j in zip(*np.nonzero(iou >= match_iou), strict=True)),
        key=lambda t: (-t[0], t[1], t[2]),
    )
    pred_match: dict[int, tuple[int, float]] = {}
    taken: set[int] = set()
    for value, i, j in pairs:
        if i in pred_match or j in taken:
            continue
        pred_match[i] = (j, value)
        taken.add(j)
    for i, p in enumerate(predicted):
        if i not in pred_match:
            out.append(RegionOutcome("rejected", p.label, None, 0.0))
            continue
        j, value = pred_match[i]
        a = annotated[j]
        same = p.label == a.label
        outcome = "accepted" if same and value >= kept_iou else "corrected"
        out.append(RegionOutcome(outcome, p.label, a.label, value, label_changed=not same))
    for j, a in enumerate(annotated):
        if j not in taken:
            out.append(RegionOutcome("added", None, a.label, 0.0))
    return out


@dataclass
class Counts:
    """Region outcomes; ``corrected`` = ``corrected_label`` + ``corrected_box``."""

    accepted: int = 0
    corrected: int = 0
    corrected_label: int = 0
    corrected_box: int = 0
    rejected: int = 0
    added: int = 0

    def add(self, o: RegionOutcome) -> None:
        setattr(self, o.outcome, getattr(self, o.outcome) + 1)
        if o.outcome == "corrected":
            if o.label_changed:
                self.corrected_label += 1
            else:
                self.corrected_box += 1

    @property
    def predicted(self) -> int:
        """Pre-labels the annotators reviewed."""
        return self.accepted + self.corrected + self.rejected

    @property
    def annotated(self) -> int:
        """Regions in the submitted annotations."""
        return self.accepted + self.corrected + self.added

    def to_dict(self) -> dict[str, Any]:
        """Counts plus rates: acceptance / correction / rejection over the pre-labels, miss rate over the
        annotated regions (the share the annotators had to draw themselves); None where undefined."""

        def rate(n: int, d: int) -> float | None:
            return round(n / d, 4) if d else None

        return {
            "predicted": self.predicted,
            "annotated": self.annotated,
            "accepted": self.accepted,
            "corrected": self.corrected,
            "corrected_label": self.corrected_label,
            "corrected_box": self.corrected_box,
            "rejected": self.rejected,
            "added": self.added,
            "acceptance_rate": rate(self.accepted, self.predicted),
            "correction_rate": rate(self.corrected, self.predicted),
            "rejection_rate": rate(self.rejected, self.predicted),
            "miss_rate": rate(self.added, self.annotated),
        }


@dataclass
class VersionReview:
    """Everything annotators did to one model version's pre-labels, overall and per class.

    Per class, accepted / corrected / rejected count under the predicted label (the model's mistake),
    added under the annotated label (what the model missed).
    """

    tasks: int = 0
    tasks_unchanged: int = 0  # every pre-label accepted and nothing added
    counts: Counts = field(default_factory=Counts)
    per_class: dict[str, Counts] = field(default_factory=dict)

    def add_task(self, outcomes: Sequence[RegionOutcome]) -> None:
        self.tasks += 1
        self.tasks_unchanged += all(o.outcome == "accepted" for o in outcomes)
        for o in outcomes:
            self.counts.add(o)
            label = o.annotated if o.outcome == "added" else o.predicted
            self.per_class.setdefault(str(label), Counts()).add(o)

    def to_dict(self) -> dict[str, Any]:
        return {
            "tasks": self.tasks,
            "tasks_unchanged": self.tasks_unchanged,
            **self.counts.to_dict(),
            "per_class": {k: self.per_class[k].to_dict() for k in sorted(self.per_class)},
        }


@dataclass(frozen=True)
class ReviewedTask:
    """One labeled task whose annotation started from a prediction: both results, as Label Studio has them."""

    task_id: int
    prediction_version: str  # the prediction's model_version, as stored ("@..." suffix included)
    predicted: Sequence[Mapping[str, Any]]
    annotated: Sequence[Mapping[str, Any]]


@dataclass
class PrelabelReview:
    """Per model version: what annotators did to its pre-labels (see the module docstring)."""

    versions: dict[str, VersionReview] = field(default_factory=dict)
    match_iou: float = MATCH_IOU
    kept_iou: float = KEPT_IOU

    def version(self, name: str | None) -> VersionReview | None:
        return self.versions.get(name) if name else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "match_iou": self.match_iou,
            "kept_iou": self.kept_iou,
            "versions": {v: self.versions[v].to_dict() for v in sorted(self.versions)},
        }


def review(
    tasks: Iterable[ReviewedTask],
    from_name: str | None = None,
    match_iou: float = MATCH_IOU,
    kept_iou: float = KEPT_IOU,
) -> PrelabelReview:
    """Compare each task's pre-labels with its annotation and sum the outcomes per model version."""
    out = PrelabelReview(match_iou=match_iou, kept_iou=kept_iou)
    for t in tasks:
        version = model_version_of(t.prediction_version)
        if not version:
            continue
        outcomes = compare(
            rectangles(t.predicted, from_name), rectangles(t.annotated, from_name), match_iou, kept_iou
        )
        out.versions.setdefault(version, VersionReview()).add_task(outcomes)
    return out
