"""The pieces of the offline active-learning simulation behind ``bench/label_efficiency.py``.

Everything the loop decides goes through the project's own code, so that the benchmark measures annoloop
and not a re-implementation of it:

- training: ``training.fit.plan_run`` / ``train_args`` / ``train_candidate`` with the project's
  ``TrainingSettings`` (AdamW, ``lr0``, base run then decayed fine-tunes, warm start), only the sizes
  changed to fit a CPU;
- scoring: ``ml_backend.model_holder.LoadedModel.predict(..., embed=True)`` (pre-NMS class scores and the
  pooled backbone embedding of the same pass) and ``ml_backend.predict_service.image_uncertainty`` with
  the configured ``uncertainty`` settings;
- ranking: ``sync.job._rank``, which builds ``Pool``/``Labeled`` exactly as ``annoloop sync`` does
  (centred embeddings, class presence from the pre-labels, labeled class counts) and calls
  ``sync.ranking.rank``;
- errors: ``training.evaluate.match_detections``.

Test-set mAP is computed here from the same predictions (greedy COCO matching with ``match_detections``
at IoU 0.50:0.95, 101-point interpolated AP as in ultralytics), because the paired bootstrap needs to
re-weight test images, which ``model.val`` cannot do.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

os.environ.setdefault("YOLO_OFFLINE", "1")

import numpy as np

from annoloop.datasets import read_voc
from annoloop.model_store import ModelVersion
from bench.hard_shapes import GeneratedImage as Item
from config.settings import InferenceSettings, RankingSettings, Settings, load_settings
from ml_backend import uncertainty as unc
from ml_backend.inference import Detections
from ml_backend.predict_service import image_uncertainty, uncertainty_config
from sync.job import _rank
from sync.ranking import Ranking
from sync.score_cache import Scored
from training.evaluate import match_detections
from training.fit import plan_run, train_args, train_candidate

log = logging.getLogger(__name__)

#: IoU thresholds of mAP50-95 (COCO).
IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
#: Bump to invalidate cached trainings and evaluations in the work folder when their meaning changes.
CACHE_VERSION = 3

STRATEGIES: tuple[str, ...] = (
    "random",
    "least_confidence",
    "entropy",
    "default",
    "kcenter",
    "class_balanced",
    "diversity",
)
STRATEGY_HELP: dict[str, str] = {
    "random": "uniform random batch (the baseline)",
    "least_confidence": "top-b by the least-confidence component alone",
    "entropy": "top-b by the entropy component alone",
    "default": "sync.ranking.rank as configured: priority (uncertainty percentile + rare class), 10% explore",
    "kcenter": "uncertainty then k-center: rank with selection kcenter (k-center among top M*b by priority)",
    "class_balanced": "rank with uncertainty_weight 0, class_balance_weight 1 (rare predicted classes)",
    "diversity": "rank without uncertainty (cold-start path): k-center over the embeddings",
}


# --------------------------------------------------------------------------- data


@dataclass
class BenchData:
    """A benchmark: the unlabeled pool the loop draws from and the fixed test set it is scored on."""

    name: str
    classes: tuple[str, ...]
    rare_class: str
    pool: list[Item]
    test: list[Item]
    description: str

    @property
    def rare_index(self) -> int:
        return self.classes.index(self.rare_class)


def load_bccd(root: Path) -> BenchData:
    """BCCD from its VOC folder, read in place: pool = its train split, test = its test split.

    Degenerate boxes (zero width or height; two in the dataset) are skipped; boxes are clipped to the image.
    The rare class is the one with the fewest boxes in the pool.
    """
    classes = ("RBC", "WBC", "Platelets")
    dataset = read_voc(Path(root))

    def split(name: str) -> list[Item]:
        items = []
        for im in (im for im in dataset.images if im.split == name):
            # VOC pixel coordinates are 1-based: the box starts one pixel earlier.
            kept = [b for b in im.boxes if b.label in classes]
            boxes = [[max(0.0, b.x0 - 1), max(0.0, b.y0 - 1), b.x1, b.y1] for b in kept]
            items.append(
                Item(
                    im.path.stem,
                    im.path,
                    im.width,
                    im.height,
                    np.asarray(boxes, dtype=np.float64).reshape(-1, 4),
                    np.asarray([classes.index(b.label) for b in kept], dtype=int),
                )
            )
        return items

    pool, test = split("train"), split("test")
    counts = np.bincount(np.concatenate([i.classes for i in pool]), minlength=len(classes))
    return BenchData(
        "bccd",
        classes,
        classes[int(np.argmin(counts))],
        pool,
        test,
        f"BCCD blood cells (VOC, 640x480): pool = train split ({len(pool)}), test = test split ({len(test)})",
    )


def class_counts(items: Sequence[Item], n_classes: int) -> np.ndarray:
    if not items:
        return np.zeros(n_classes, dtype=int)
    return np.bincount(np.concatenate([i.classes for i in items]).astype(int), minlength=n_classes)


# --------------------------------------------------------------------------- training


@dataclass(frozen=True)
class TrainConfig:
    """How every model of a run is trained (identical for every strategy: same budget, same settings).

    ``mode="warm"`` is the project's loop: cycle 0 is a base run from ``init`` (``base_epochs`` at
    ``lr0``), cycle k a fine-tune of cycle k-1's model on all labeled images (``finetune_epochs`` at
    ``lr0 * lr_decay**k``), as ``training.fit.plan_run`` plans them. ``mode="retrain"`` trains every
    cycle from ``init`` for ``base_epochs`` (the textbook protocol: no path dependence, costlier).
    """

    imgsz: int
    base_epochs: int
    finetune_epochs: int
    batch: int = 16
    mode: Literal["warm", "retrain"] = "warm"
    device: str = "cpu"
    #: More ultralytics arguments, passed through ``training.train_args`` (not managed ones).
    extra: tuple[tuple[str, Any], ...] = ()

    def settings(self, seed: int) -> Settings:
        return load_settings(
            env={},
            overrides={
                "training": {
                    "imgsz": self.imgsz,
                    "batch": self.batch,
                    "base_epochs": self.base_epochs,
                    "finetune_epochs": self.finetune_epochs,
                    "device": self.device,
                    "workers": 0,
                    "seed": seed,
                    "amp": False,
                    # nbs = batch: one optimizer step per batch. The default 64 accumulates gradients over
                    # 64 images, which leaves a 20-image set a handful of steps (measured on BCCD, 20 images,
                    # 30 epochs at 256: mAP50 0.05 at batch 16 / nbs 64 vs 0.71 at batch 4 / nbs 4).
                    "train_args": {"nbs": self.batch, **dict(self.extra)},
                },
                "inference": {"device": self.device, "imgsz": self.imgsz},
            },
        )


@dataclass
class _DataRef:
    """What ``training.fit.train_args`` reads of a ``training.dataset.Dataset``: its ``data_yaml``."""

    data_yaml: Path


def write_yolo_set(items: Sequence[Item], classes: Sequence[str], root: Path) -> Path:
    """A YOLO dataset of symlinks to ``items`` (train) and a 2-image val stub; returns its data.yaml.

    The stub keeps ultralytics' end-of-training validation cheap: the benchmark evaluates on the test
    set itself, and nothing about the test set may influence training.
    """
    if root.exists():
        shutil.rmtree(root)
    for split, part in (("train", items), ("val", items[:2])):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for it in part:
            os.symlink(Path(it.path).resolve(), root / "images" / split / f"{it.name}{Path(it.path).suffix}")
            lines = [
                f"{c} {(b[0] + b[2]) / 2 / it.width:.6f} {(b[1] + b[3]) / 2 / it.height:.6f} "
                f"{(b[2] - b[0]) / it.width:.6f} {(b[3] - b[1]) / it.height:.6f}"
                for b, c in zip(it.boxes, it.classes, strict=True)
            ]
            (root / "labels" / split / f"{it.name}.txt").write_text("".join(x + "\n" for x in lines))
    names = "".join(f"  {i}: {json.dumps(n)}\n" for i, n in enumerate(classes))
    data = root / "data.yaml"
    data.write_text(
        f"path: {json.dumps(str(root.resolve()))}\ntrain: images/train\nval: images/val\nnames:\n{names}"
    )
    return data


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """ultralytics prints a screenful per run; keep the benchmark's own table readable."""
    from ultralytics.utils import LOGGER

    level = LOGGER.level
    LOGGER.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        LOGGER.setLevel(level)


def train_model(
    items: Sequence[Item],
    classes: Sequence[str],
    *,
    init: Path,
    generation: int,
    cfg: TrainConfig,
    seed: int,
    out: Path,
) -> Path:
    """Train one cycle's model with the project's training code; its weights end up at ``out``."""
    settings = cfg.settings(seed).training
    work = out.parent / (out.stem + "-work")
    data = write_yolo_set(items, classes, work / "data")
    if cfg.mode == "warm" and generation > 0:
        plan = plan_run(settings, init, generation)
    else:
        plan = plan_run(settings, init, 0)  # a base run from init, whatever cycle
    args = train_args(settings, plan, _DataRef(data), cfg.device, work / "runs")  # type: ignore[arg-type]
    with _quiet():
        last = train_candidate(args, plan.init)
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(last, out)
    shutil.rmtree(work, ignore_errors=True)
    return out


# --------------------------------------------------------------------------- inference


class ImageStore:
    """Decoded BGR images by path, read once per process (the pool is predicted every cycle)."""

    def __init__(self) -> None:
        self._cache: dict[Path, np.ndarray] = {}

    def get(self, path: Path) -> np.ndarray:
        img = self._cache.get(path)
        if img is None:
            import cv2

            img = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if img is None:
                raise OSError(f"cannot read image {path}")
            self._cache[path] = img
        return img


def predict(
    weights: Path, items: Sequence[Item], cfg: TrainConfig, store: ImageStore, batch: int = 32
) -> list[Detections]:
    """The served model's view of ``items``: ``LoadedModel.predict(..., embed=True)`` down to conf 0.001.

    One pass serves both uses: mAP wants every box down to 0.001 (as ultralytics' val), while uncertainty
    filters at ``inference.uncertainty_conf`` and pre-labels at ``inference.prelabel_conf`` themselves.
    """
    from ml_backend.model_holder import LoadedModel

    inf = InferenceSettings(device=cfg.device, imgsz=cfg.imgsz, uncertainty_conf=0.001, prelabel_conf=0.25)
    folder = weights.parent / f"{weights.stem}-served" / "v"
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "model.pt").exists():
        os.symlink(weights.resolve(), folder / "model.pt")
    with _quiet():
        model = LoadedModel(ModelVersion("bench", "v", folder), inf)
        out: list[Detections] = []
        for s in range(0, len(items), batch):
            out.extend(model.predict([store.get(i.path) for i in items[s : s + batch]], embed=True))
    return out


# --------------------------------------------------------------------------- evaluation


@dataclass
class TestMatches:
    """Everything AP needs about one model on the test set, per prediction, sorted by confidence.

    Kept instead of a single number so the bootstrap can re-weight test images without predicting again.
    """

    image: np.ndarray  # (n,) int32 test-image index of each prediction
    conf: np.ndarray  # (n,) float32
    cls: np.ndarray  # (n,) int16
    tp: np.ndarray  # (n, 10) bool: true positive at each IoU threshold
    gt_counts: np.ndarray  # (n_images, n_classes) int32

    def save(self, path: Path) -> None:
        np.savez_compressed(path, **asdict(self))

    @classmethod
    def load(cls, path: Path) -> TestMatches:
        with np.load(path) as z:
            return cls(**{k: z[k] for k in ("image", "conf", "cls", "tp", "gt_counts")})


def match_test(dets: Sequence[Detections], items: Sequence[Item], n_classes: int) -> TestMatches:
    images, confs, classes, tps = [], [], [], []
    gt = np.zeros((len(items), n_classes), dtype=np.int32)
    for k, (det, it) in enumerate(zip(dets, items, strict=True)):
        gt[k] = np.bincount(it.classes.astype(int), minlength=n_classes)
        n = len(det.confidences)
        if n == 0:
            continue
        tp = np.zeros((n, len(IOU_THRESHOLDS)), dtype=bool)
        for j, t in enumerate(IOU_THRESHOLDS):
            tp[:, j] = match_detections(
                det.boxes, det.classes, det.confidences, it.boxes, it.classes, iou_threshold=float(t)
            ).pred_tp
        images.append(np.full(n, k, dtype=np.int32))
        confs.append(det.confidences.astype(np.float32))
        classes.append(det.classes.astype(np.int16))
        tps.append(tp)
    if not images:
        return TestMatches(
            np.zeros(0, np.int32), np.zeros(0, np.float32), np.zeros(0, np.int16), np.zeros((0, 10), bool), gt
        )
    conf = np.concatenate(confs)
    order = np.argsort(-conf, kind="stable")
    return TestMatches(
        np.concatenate(images)[order],
        conf[order],
        np.concatenate(classes)[order],
        np.concatenate(tps)[order],
        gt,
    )


_AP_X = np.linspace(0.0, 1.0, 101)


def _ap(recall: np.ndarray, precision: np.ndarray) -> float:
    """101-point interpolated AP, with ultralytics' ``compute_ap`` sentinels, so the numbers compare."""
    mrec = np.concatenate(([0.0], recall, [recall[-1] if len(recall) else 1.0], [1.0]))
    mpre = np.concatenate(([1.0], precision, [0.0], [0.0]))
    mpre = np.flip(np.maximum.accumulate(np.flip(mpre)))
    return float(np.trapezoid(np.interp(_AP_X, mrec, mpre), _AP_X))


def average_precision(
    m: TestMatches, weights: np.ndarray | None = None, thresholds: Sequence[int] = tuple(range(10))
) -> np.ndarray:
    """(n_classes, len(thresholds)) AP; NaN for a class without ground truth (left out of the mean).

    ``weights`` (n_images,) counts each test image that many times (a bootstrap resample).
    """
    n_classes = m.gt_counts.shape[1]
    w_img = np.ones(len(m.gt_counts)) if weights is None else np.asarray(weights, dtype=np.float64)
    n_gt = w_img @ m.gt_counts
    w = w_img[m.image] if len(m.image) else np.zeros(0)
    out = np.full((n_classes, len(thresholds)), np.nan)
    for c in range(n_classes):
        if n_gt[c] <= 0:
            continue
        sel = (m.cls == c) & (w > 0)
        wc = w[sel]
        for j, t in enumerate(thresholds):
            if not sel.any():
                out[c, j] = 0.0
                continue
            tp = m.tp[sel, t]
            tpc = np.cumsum(wc * tp)
            fpc = np.cumsum(wc * ~tp)
            out[c, j] = _ap(tpc / (n_gt[c] + 1e-16), tpc / (tpc + fpc))
    return out


def scores(m: TestMatches) -> dict[str, Any]:
    ap = average_precision(m)
    return {
        "mAP50": float(np.nanmean(ap[:, 0])),
        "mAP50-95": float(np.nanmean(ap.mean(axis=1))),
        "ap50_per_class": [None if np.isnan(v) else float(v) for v in ap[:, 0]],
    }


def image_errors(det: Detections, item: Item, prelabel_conf: float) -> tuple[int, int]:
    """(FN, FP) of the pre-labels (boxes >= ``prelabel_conf``) against ground truth at IoU 0.5."""
    keep = det.confidences >= prelabel_conf
    m = match_detections(det.boxes[keep], det.classes[keep], det.confidences[keep], item.boxes, item.classes)
    return m.fn, m.fp


# --------------------------------------------------------------------------- strategies


@dataclass
class PoolView:
    """One model's scoring of the whole pool (labeled and unlabeled), built once per cycle."""

    rows: list[Scored]  # indexed like the pool; uncertainty = the configured combined value
    dets: list[Detections]
    components: np.ndarray  # (n_pool, len(unc.COMPONENT_NAMES)); empty images hold empty_floor


def score_pool(dets: Sequence[Detections], data: BenchData, settings: Settings) -> PoolView:
    """What ``annoloop sync`` scores per task: uncertainty, pre-label counts per class and the embedding."""
    cfg = uncertainty_config(settings)
    inf = settings.inference
    rows, comps = [], np.zeros((len(dets), len(unc.COMPONENT_NAMES)))
    for k, (det, it) in enumerate(zip(dets, data.pool, strict=True)):
        u = image_uncertainty(det, cfg, inf.uncertainty_conf)
        comps[k] = [cfg.empty_floor if u.empty else u.components[n] for n in unc.COMPONENT_NAMES]
        pre = det.confidences >= inf.prelabel_conf
        labels = dict(Counter(data.classes[int(c)] for c in det.classes[pre]))
        assert det.embedding is not None
        rows.append(Scored(k, it.name, "bench", u.value, det.embedding, labels))
    return PoolView(rows, list(dets), comps)


def component_uncertainty(view: PoolView, settings: Settings, name: str) -> np.ndarray:
    """Per-image uncertainty with only ``name`` weighted, through the project's ``image_uncertainty``."""
    base = uncertainty_config(settings)
    cfg = unc.UncertaintyConfig(
        weights={name: 1.0},
        aggregation=base.aggregation,
        top_k=base.top_k,
        empty_floor=base.empty_floor,
        count_half_saturation=base.count_half_saturation,
    )
    inf_conf = settings.inference.uncertainty_conf
    return np.array([image_uncertainty(d, cfg, inf_conf).value for d in view.dets])


def ranking_settings(strategy: str, settings: Settings, batch: int, seed: int) -> RankingSettings:
    """The configured ``sync.ranking`` with the simulation's batch size and seed, and the strategy's weights."""
    base = settings.sync.ranking.model_dump() | {"batch_size": batch, "seed": seed}
    if strategy == "class_balanced":
        base |= {"uncertainty_weight": 0.0, "class_balance_weight": 1.0}
    elif strategy == "kcenter":
        base |= {"selection": "kcenter"}
    elif strategy == "diversity":
        base |= {"class_balance_weight": 0.0}
    return RankingSettings(**base)


def order_pool(
    strategy: str,
    view: PoolView | None,
    labeled: Sequence[int],
    data: BenchData,
    settings: Settings,
    *,
    batch: int,
    seed: int,
    rng: np.random.Generator,
    ranking_overrides: dict[str, Any] | None = None,
) -> np.ndarray:
    """The strategy's order of the unlabeled pool, as pool indices (label first = first).

    A simulated annotation round labels the first ``batch`` entries.
    """
    lab = set(labeled)
    unlabeled = np.array([i for i in range(len(data.pool)) if i not in lab], dtype=np.intp)
    if strategy == "random":
        return rng.permutation(unlabeled)
    if view is None:
        raise ValueError(f"strategy {strategy!r} needs the model's scores of the pool")
    if strategy in ("least_confidence", "entropy"):
        u = component_uncertainty(view, settings, strategy)[unlabeled]
        return unlabeled[np.argsort(-u, kind="stable")]
    if strategy in ("default", "kcenter", "class_balanced", "diversity"):
        rs = ranking_settings(strategy, settings, batch, seed)
        if ranking_overrides:
            rs = RankingSettings(**(rs.model_dump() | ranking_overrides))
        ranking: Ranking = _rank(
            [view.rows[i] for i in unlabeled],
            [view.rows[i] for i in labeled],
            Counter(
                {
                    data.classes[c]: int(n)
                    for c, n in enumerate(class_counts([data.pool[i] for i in labeled], len(data.classes)))
                }
            ),
            rs,
            cold=strategy == "diversity",
        )
        return unlabeled[ranking.order]
    raise ValueError(f"unknown strategy {strategy!r}, expected one of {STRATEGIES}")


def pick_stats(picked: Sequence[int], data: BenchData) -> dict[str, Any]:
    """What a batch holds: boxes per class, rare-class images, shifted-domain images, distinct scenes."""
    items = [data.pool[i] for i in picked]
    counts = class_counts(items, len(data.classes))
    out: dict[str, Any] = {
        "boxes": {c: int(n) for c, n in zip(data.classes, counts, strict=True)},
        "rare_images": int(sum(data.rare_index in set(i.classes.tolist()) for i in items)),
    }
    if items and "shifted" in items[0].tags:
        out["shifted_images"] = int(sum(bool(i.tags["shifted"]) for i in items))
        out["distinct_scenes"] = len({i.tags["group"] for i in items})
    return out


# --------------------------------------------------------------------------- statistics


def labels_to_reach(labels: Sequence[float], curve: Sequence[float], target: float) -> float | None:
    """Labels at which the learning curve first reaches ``target`` (linear interpolation); None if never."""
    x, y = np.asarray(labels, float), np.asarray(curve, float)
    for k in range(len(y)):
        if y[k] >= target:
            if k == 0:
                return float(x[0])
            return float(x[k - 1] + (target - y[k - 1]) / (y[k] - y[k - 1]) * (x[k] - x[k - 1]))
    return None


def auc(labels: Sequence[float], curve: Sequence[float]) -> float:
    """Area under the learning curve divided by its label range: the mean mAP over the budget, in [0, 1]."""
    x, y = np.asarray(labels, float), np.asarray(curve, float)
    if len(x) < 2:
        return float(y[0]) if len(y) else float("nan")
    return float(np.trapezoid(y, x) / (x[-1] - x[0]))


def stable_hash(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:12]
