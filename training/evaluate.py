"""Score a model on the held-out tasks: mAP from ultralytics, TP/FP/FN at the pre-label threshold, errors.

Two views, because they answer different questions:

- mAP50 / mAP50-95 (ultralytics' ``model.val``) rank models over all confidence thresholds: the promotion
  metric by default.
- TP / FP / FN, precision, recall and F1 at ``inference.prelabel_conf`` with IoU >= 0.5 matching (written
  here, small, in numpy) are what annotators live with: a pre-label they must delete is a FP, an object
  they must draw is a FN. The error analysis breaks those down by class, box size and image position.

Candidate and current model are scored on the same held-out images. The candidate is also scored, with the
same code, on a bounded sample of its own training images: the gap between the two is what the
overfitting rule of :mod:`training.convergence` watches. The current model may name its
classes differently from the labeling config (the default model's ``circle`` for a ``Circle`` label, or via
``predicted_values``): its classes are mapped onto the config's labels as the backend maps them when it
serves pre-labels, and a config class it cannot predict at all scores AP 0, so that both models are
averaged over the same classes.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ml_backend.label_config import map_classes
from training.dataset import Dataset, LabeledImage, YoloBox

log = logging.getLogger(__name__)

#: Box area as a fraction of the image area: below SMALL is "small", from LARGE on "large".
#: (COCO's 32² and 96² pixel limits are 0.25% and 2.25% of a 640x640 image; fractions keep the buckets
#: meaningful whatever the image size.)
SIZE_SMALL = 0.01
SIZE_LARGE = 0.10
GRID = 3
IOU_MATCH = 0.5


# --- pure matching -------------------------------------------------------------------------------------


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of xyxy boxes: (n, 4) x (m, 4) -> (n, m), in any units, normalised included.

    Not ultralytics' ``metrics.box_iou``: its epsilon in the denominator turns an IoU of exactly 0.5 into a
    miss, and the TP/FP/FN counts here treat the 0.5 threshold as inclusive.
    """
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(axis=2)
    area_a = (a[:, 2] - a[:, 0]).clip(0) * (a[:, 3] - a[:, 1]).clip(0)
    area_b = (b[:, 2] - b[:, 0]).clip(0) * (b[:, 3] - b[:, 1]).clip(0)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


@dataclass
class Match:
    """Per-prediction and per-ground-truth outcome of matching one image."""

    pred_tp: np.ndarray  # (n_pred,) bool: matched a same-class ground truth at IoU >= threshold
    gt_matched: np.ndarray  # (n_gt,) bool
    pred_gt: np.ndarray  # (n_pred,) int: index of the matched ground truth, -1 if none

    @property
    def tp(self) -> int:
        return int(self.pred_tp.sum())

    @property
    def fp(self) -> int:
        return int((~self.pred_tp).sum())

    @property
    def fn(self) -> int:
        return int((~self.gt_matched).sum())


def match_detections(
    pred_boxes: np.ndarray,
    pred_classes: np.ndarray,
    pred_scores: np.ndarray,
    gt_boxes: np.ndarray,
    gt_classes: np.ndarray,
    iou_threshold: float = IOU_MATCH,
) -> Match:
    """Greedy matching as in COCO/VOC: predictions by descending score each take the unmatched
    ground truth of their class with the highest IoU, if that IoU >= ``iou_threshold``.

    A second prediction on an already matched object is a FP (a duplicate an annotator must delete).
    """
    pred_boxes = np.asarray(pred_boxes, dtype=np.float64).reshape(-1, 4)
    gt_boxes = np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 4)
    pred_classes = np.asarray(pred_classes).reshape(-1).astype(int)
    gt_classes = np.asarray(gt_classes).reshape(-1).astype(int)
    scores = np.asarray(pred_scores, dtype=np.float64).reshape(-1)
    n, m = len(pred_boxes), len(gt_boxes)
    pred_tp = np.zeros(n, dtype=bool)
    pred_gt = np.full(n, -1, dtype=int)
    gt_matched = np.zeros(m, dtype=bool)
    if n and m:
        iou = box_iou(pred_boxes, gt_boxes)
        iou[pred_classes[:, None] != gt_classes[None, :]] = -1.0
        for i in np.argsort(-scores, kind="stable"):
            candidates = np.where(gt_matched, -1.0, iou[i])
            j = int(np.argmax(candidates))
            if candidates[j] >= iou_threshold:
                pred_tp[i], pred_gt[i], gt_matched[j] = True, j, True
    return Match(pred_tp, gt_matched, pred_gt)


def size_bucket(box: Sequence[float]) -> str:
    """small / medium / large by the box's share of the image area (normalised xyxy)."""
    area = max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])
    return "small" if area < SIZE_SMALL else "large" if area >= SIZE_LARGE else "medium"


def grid_cell(box: Sequence[float]) -> tuple[int, int]:
    """(row, column) of the box centre in a GRID x GRID grid over the image (normalised xyxy)."""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    return (min(GRID - 1, max(0, int(cy * GRID))), min(GRID - 1, max(0, int(cx * GRID))))


@dataclass
class ErrorAnalysis:
    """Where a model's misses (FN) and spurious pre-labels (FP) are."""

    fn_by_class: dict[str, int] = field(default_factory=dict)
    fp_by_class: dict[str, int] = field(default_factory=dict)
    fn_by_size: dict[str, int] = field(default_factory=lambda: dict.fromkeys(("small", "medium", "large"), 0))
    fp_by_size: dict[str, int] = field(default_factory=lambda: dict.fromkeys(("small", "medium", "large"), 0))
    fn_by_cell: list[list[int]] = field(default_factory=lambda: [[0] * GRID for _ in range(GRID)])
    fp_by_cell: list[list[int]] = field(default_factory=lambda: [[0] * GRID for _ in range(GRID)])
    #: FP kinds: a second box on a matched object, the right place with the wrong class, a box in the right
    #: place and class but IoU < 0.5 (localisation), or nothing there at all (background).
    fp_kinds: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(("duplicate", "wrong_class", "localization", "background"), 0)
    )
    #: "predicted -> true" label pairs of wrong_class FPs.
    confusions: dict[str, int] = field(default_factory=dict)

    def add(
        self,
        match: Match,
        pred_boxes: np.ndarray,
        pred_classes: np.ndarray,
        gt_boxes: np.ndarray,
        gt_classes: np.ndarray,
        names: Sequence[str],
    ) -> None:
        pred_boxes = np.asarray(pred_boxes, dtype=np.float64).reshape(-1, 4)
        gt_boxes = np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 4)
        for j in np.flatnonzero(~match.gt_matched):
            name = names[int(gt_classes[j])]
            self.fn_by_class[name] = self.fn_by_class.get(name, 0) + 1
            self.fn_by_size[size_bucket(gt_boxes[j])] += 1
            r, c = grid_cell(gt_boxes[j])
            self.fn_by_cell[r][c] += 1
        iou = box_iou(pred_boxes, gt_boxes) if len(gt_boxes) else np.zeros((len(pred_boxes), 0))
        for i in np.flatnonzero(~match.pred_tp):
            cls = int(pred_classes[i])
            name = names[cls]
            self.fp_by_class[name] = self.fp_by_class.get(name, 0) + 1
            self.fp_by_size[size_bucket(pred_boxes[i])] += 1
            r, c = grid_cell(pred_boxes[i])
            self.fp_by_cell[r][c] += 1
            same = gt_classes == cls
            row = iou[i] if iou.shape[1] else np.zeros(0)
            if (row[same & match.gt_matched] >= IOU_MATCH).any():
                self.fp_kinds["duplicate"] += 1
            elif (row[~same] >= IOU_MATCH).any():
                self.fp_kinds["wrong_class"] += 1
                true = names[int(gt_classes[~same][int(np.argmax(row[~same]))])]
                key = f"{name} -> {true}"
                self.confusions[key] = self.confusions.get(key, 0) + 1
            elif (row[same] >= 0.1).any():
                self.fp_kinds["localization"] += 1
            else:
                self.fp_kinds["background"] += 1


def prf(tp: int, fp: int, fn: int) -> dict[str, float]:
    """Precision, recall, F1; 0 where undefined (no predictions, no objects)."""
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    return {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0}


# --- running models ------------------------------------------------------------------------------------


@dataclass
class ModelEvaluation:
    """One model's scores on the held-out set (all in the labeling config's label space)."""

    model: str  # which model: "candidate", or "<project>/<version>" of the served one
    images: int
    objects: int
    overall: dict[str, float | int | None]
    per_class: dict[str, dict[str, float | int | None]]
    errors: ErrorAnalysis
    class_map: dict[str, str]  # model class name -> config label
    ultralytics: dict[str, float]
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """The scores without the error analysis (the model card keeps that in its own section)."""
        out = asdict(self)
        out.pop("errors")
        return out


def class_mapping(model_names: Mapping[int, str], dataset: Dataset) -> dict[int, int]:
    """Model class index -> dataset class index, mapped as the backend maps classes onto labels."""
    index = {name: i for i, name in enumerate(dataset.classes)}
    return {m: index[label] for m, label in map_classes(dataset.control, dict(model_names)).items()}


def _gt_arrays(boxes: Sequence[YoloBox]) -> tuple[np.ndarray, np.ndarray]:
    xyxy = np.array([b.xyxy() for b in boxes], dtype=np.float64).reshape(-1, 4)
    return xyxy, np.array([b.cls for b in boxes], dtype=int)


def write_eval_set(
    items: Sequence[LabeledImage], mapping: dict[int, int], model_names: Mapping[int, str], root: Path
) -> Path:
    """A val-only YOLO dataset of ``items`` (the held-out images) with labels in the model's class indices.

    ultralytics scores in the model's class space; labels of config classes the model cannot predict are
    left out here and score AP 0 in :func:`evaluate_model`.
    """
    to_model = {d: m for m, d in sorted(mapping.items(), reverse=True)}  # lowest model index wins
    img_dir, lbl_dir = root / "images" / "val", root / "labels" / "val"
    img_dir.mkdir(parents=True, exist_ok=True)
    lbl_dir.mkdir(parents=True, exist_ok=True)
    for item in items:
        link = img_dir / item.image.name
        if not link.exists():
            os.symlink(item.image, link)
        lines = [
            YoloBox(to_model[b.cls], b.cx, b.cy, b.w, b.h).line() + "\n"
            for b in item.boxes
            if b.cls in to_model
        ]
        (lbl_dir / f"{item.image.stem}.txt").write_text("".join(lines))
    names = "".join(f"  {i}: {_json(n)}\n" for i, n in sorted(model_names.items()))
    data_yaml = root / "data.yaml"
    data_yaml.write_text(f"path: {_json(str(root))}\ntrain: images/val\nval: images/val\nnames:\n{names}")
    return data_yaml


def _json(s: str) -> str:
    return json.dumps(s)  # a JSON string is a valid YAML scalar, whatever the label holds


def evaluate_model(
    weights: Path,
    dataset: Dataset,
    *,
    workdir: Path,
    conf: float,
    iou_nms: float,
    imgsz: int,
    device: str,
    batch: int = 16,
    mapping: dict[int, int] | None = None,
    label: str = "",
    items: Sequence[LabeledImage] | None = None,
) -> ModelEvaluation:
    """Score ``weights`` on ``items`` (default: ``dataset.holdout``); ``mapping`` (model -> dataset class)
    defaults to the backend's label mapping. Everything ultralytics writes goes under ``workdir``."""
    from ultralytics import YOLO

    started = time.perf_counter()
    model = YOLO(str(weights))
    names = {int(k): str(v) for k, v in model.names.items()}
    if mapping is None:
        mapping = class_mapping(names, dataset)
    classes = dataset.classes
    errors = ErrorAnalysis()
    counts = {c: {"tp": 0, "fp": 0, "fn": 0, "objects": 0} for c in classes}
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)

    items = list(dataset.holdout if items is None else items)
    for start in range(0, len(items), batch):
        part = items[start : start + batch]
        results = model.predict(
            [str(h.image) for h in part], conf=conf, iou=iou_nms, imgsz=imgsz, device=device, verbose=False
        )
        for item, res in zip(part, results, strict=True):
            b = res.boxes
            raw_cls = b.cls.cpu().numpy().astype(int)
            keep = np.array([c in mapping for c in raw_cls], dtype=bool)
            p_boxes = b.xyxyn.cpu().numpy().astype(np.float64)[keep]
            p_cls = np.array([mapping[c] for c in raw_cls[keep]], dtype=int)
            p_conf = b.conf.cpu().numpy()[keep]
            g_boxes, g_cls = _gt_arrays(item.boxes)
            match = match_detections(p_boxes, p_cls, p_conf, g_boxes, g_cls)
            errors.add(match, p_boxes, p_cls, g_boxes, g_cls, classes)
            for k, name in enumerate(classes):
                counts[name]["tp"] += int((match.pred_tp & (p_cls == k)).sum())
                counts[name]["fp"] += int((~match.pred_tp & (p_cls == k)).sum())
                counts[name]["fn"] += int((~match.gt_matched & (g_cls == k)).sum())
                counts[name]["objects"] += int((g_cls == k).sum())

    # mAP over all thresholds from ultralytics, in the model's class space, mapped back to config labels.
    ap50: dict[int, float] = {}
    ap: dict[int, float] = {}
    raw: dict[str, float] = {}
    if any(item.boxes for item in items):
        data_yaml = write_eval_set(items, mapping, names, workdir / "data")
        metrics = model.val(
            data=str(data_yaml),
            split="val",
            imgsz=imgsz,
            batch=batch,
            device=device,
            plots=False,
            verbose=False,
            project=str(workdir / "runs"),
            name="val",
            exist_ok=True,
            workers=0,
        )
        box = metrics.box
        for i, c in enumerate(box.ap_class_index):
            ap50[int(c)], ap[int(c)] = float(box.ap50[i]), float(box.ap[i])
        raw = {
            "mAP50": float(box.map50),
            "mAP50-95": float(box.map),
            "mp": float(box.mp),
            "mr": float(box.mr),
        }

    to_model = {d: m for m, d in sorted(mapping.items(), reverse=True)}
    per_class: dict[str, dict[str, float | int | None]] = {}
    present: list[str] = []
    for k, name in enumerate(classes):
        c = counts[name]
        has_gt = c["objects"] > 0
        if has_gt:
            present.append(name)
        m = to_model.get(k)
        per_class[name] = {
            **c,
            **prf(c["tp"], c["fp"], c["fn"]),
            "mAP50": (ap50.get(m, 0.0) if m is not None else 0.0) if has_gt else None,
            "mAP50-95": (ap.get(m, 0.0) if m is not None else 0.0) if has_gt else None,
        }
    tp = sum(c["tp"] for c in counts.values())
    fp = sum(c["fp"] for c in counts.values())
    fn = sum(c["fn"] for c in counts.values())
    overall: dict[str, float | int | None] = {
        "tp": tp,
        "fp": fp,
        "fn": fn,
        **prf(tp, fp, fn),
        "mAP50": float(np.mean([per_class[n]["mAP50"] for n in present])) if present else None,
        "mAP50-95": float(np.mean([per_class[n]["mAP50-95"] for n in present])) if present else None,
    }
    return ModelEvaluation(
        model=label or str(weights),
        images=len(items),
        objects=sum(c["objects"] for c in counts.values()),
        overall=overall,
        per_class=per_class,
        errors=errors,
        class_map={names[m]: classes[d] for m, d in sorted(mapping.items())},
        ultralytics=raw,
        seconds=round(time.perf_counter() - started, 2),
    )
