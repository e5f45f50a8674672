"""Per-image uncertainty scores for active learning.

Pure numpy functions: a model's raw per-image output goes in, one value in [0, 1] comes out
(1 = the model is most unsure, so the image is the most worth labelling next). No torch, no I/O, so that
the ranking logic can be tested on hand-computed numbers and reused by any model wrapper.

Detection heads (YOLO) give, per candidate box, independent per-class sigmoid scores that are not a
distribution; we normalise them into one (``class_distribution``) before applying the classic
least-confidence / entropy / margin measures. Classification models already give a softmax.

Every component is scaled to [0, 1] so that weights in ``combine`` mean what they say.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np

ComponentName = Literal["least_confidence", "entropy", "margin", "confidence_variance", "detection_count"]
Aggregation = Literal["mean", "max", "topk_sum"]

COMPONENT_NAMES: tuple[str, ...] = get_args(ComponentName)
AGGREGATIONS: tuple[str, ...] = get_args(Aggregation)
# Components computed per region (then aggregated) vs. once per image.
REGION_COMPONENTS: tuple[str, ...] = ("least_confidence", "entropy", "margin")


# --------------------------------------------------------------------------- input checks


def _as_float_array(x: object, name: str) -> np.ndarray:
    """float64 copy-free view when possible; float32 inputs are upcast so sums do not lose precision."""
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name}: expected numeric array, got {type(x).__name__}") from exc
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name}: contains NaN or infinite values")
    return arr


def _as_dist(dist: np.ndarray) -> np.ndarray:
    arr = _as_float_array(dist, "dist")
    if arr.ndim != 2:
        raise ValueError(f"dist: expected shape (n, k), got {arr.shape}")
    if arr.shape[1] < 1:
        raise ValueError(f"dist: needs at least one class, got shape {arr.shape}")
    return arr


def _as_values(values: object, name: str = "values") -> np.ndarray:
    arr = _as_float_array(values, name)
    if arr.ndim != 1:
        raise ValueError(f"{name}: expected shape (n,), got {arr.shape}")
    return arr


# --------------------------------------------------------------------------- per-region measures


def class_distribution(scores: np.ndarray) -> np.ndarray:
    """(n, k) non-negative per-class scores -> rows normalised to sum 1. A row of all zeros becomes uniform.
    Accepts (k,) too (returns (k,)).

    Why: YOLO class scores are independent sigmoids, so least-confidence/entropy/margin need them turned
    into a distribution first. An all-zero row carries no preference for any class, hence uniform.
    Note the normalisation keeps only the *relative* class preference: a weak box whose only non-zero
    score is 0.1 becomes one-hot. Low absolute confidence is captured by the other components.
    """
    arr = _as_float_array(scores, "scores")
    if arr.ndim not in (1, 2):
        raise ValueError(f"scores: expected shape (n, k) or (k,), got {arr.shape}")
    if arr.shape[-1] < 1:
        raise ValueError(f"scores: needs at least one class, got shape {arr.shape}")
    if np.any(arr < 0):
        raise ValueError("scores: class scores must be non-negative")
    rows = np.atleast_2d(arr)
    sums = rows.sum(axis=1, keepdims=True)
    k = rows.shape[1]
    # Divide only where the row has mass; zero rows become uniform.
    out = np.where(sums > 0, rows / np.where(sums > 0, sums, 1.0), 1.0 / k)
    return out[0] if arr.ndim == 1 else out


def least_confidence(dist: np.ndarray) -> np.ndarray:
    """(n, k) distributions -> (n,) (1 - max p) scaled by k/(k-1) so it spans [0, 1]; k == 1 -> zeros.

    Why the scaling: max p is at least 1/k, so raw 1 - max p tops out at (k-1)/k; scaling makes a uniform
    distribution score 1.0 whatever the number of classes.
    """
    d = _as_dist(dist)
    n, k = d.shape
    if k == 1:
        return np.zeros(n)
    return np.clip((1.0 - d.max(axis=1)) * k / (k - 1), 0.0, 1.0)


def entropy(dist: np.ndarray) -> np.ndarray:
    """(n, k) -> (n,) Shannon entropy divided by ln k (so in [0, 1]); 0*log0 = 0; k == 1 -> zeros.

    Why: entropy looks at the whole distribution (not only the top class); dividing by its maximum ln k
    makes it comparable across models with different class counts.
    """
    d = _as_dist(dist)
    n, k = d.shape
    if k == 1:
        return np.zeros(n)
    # 0 * log 0 = 0: take the log only where p > 0.
    plogp = np.where(d > 0, d * np.log(np.where(d > 0, d, 1.0)), 0.0)
    return np.clip(-plogp.sum(axis=1) / math.log(k), 0.0, 1.0)


def margin(dist: np.ndarray) -> np.ndarray:
    """(n, k) -> (n,) 1 - (p_top1 - p_top2); k == 1 -> zeros.

    Why: a small gap between the two best classes is exactly the confusion a label resolves.
    """
    d = _as_dist(dist)
    n, k = d.shape
    if k == 1:
        return np.zeros(n)
    top2 = np.sort(d, axis=1)[:, -2:]  # ascending: [:, 0] second best, [:, 1] best
    return np.clip(1.0 - (top2[:, 1] - top2[:, 0]), 0.0, 1.0)


# --------------------------------------------------------------------------- per-image measures


def confidence_variance(confidences: np.ndarray) -> float:
    """Population variance of the per-region confidences, times 4 (values in [0,1] have variance
    <= 0.25), so in [0, 1]; fewer than 2 regions -> 0.0.

    Why: an image mixing sure and unsure boxes is one the model only half understands.
    """
    c = _as_values(confidences, "confidences")
    if c.size < 2:
        return 0.0
    return float(np.clip(4.0 * np.var(c), 0.0, 1.0))


def detection_count(n: int, half_saturation: float) -> float:
    """n / (n + half_saturation): more objects -> more to learn from, saturating; half_saturation > 0.

    Why saturating: a crowded image is worth more than a near-empty one, but 200 boxes should not
    outweigh real uncertainty; ``half_saturation`` objects give 0.5.
    """
    if n < 0:
        raise ValueError(f"detection_count: n must be >= 0, got {n}")
    if not (half_saturation > 0 and math.isfinite(half_saturation)):
        raise ValueError(
            f"detection_count: half_saturation must be a finite number > 0, got {half_saturation}"
        )
    return float(n / (n + half_saturation))


# --------------------------------------------------------------------------- aggregation


def mean(values: np.ndarray) -> float:
    """Mean of the per-region values; empty -> 0.0."""
    v = _as_values(values)
    return float(v.mean()) if v.size else 0.0


def maximum(values: np.ndarray) -> float:
    """Largest per-region value; empty -> 0.0."""
    v = _as_values(values)
    return float(v.max()) if v.size else 0.0


def topk_sum(values: np.ndarray, k: int) -> float:
    """Sum of the k largest values (all of them when fewer than k); empty -> 0.0."""
    if k < 1:
        raise ValueError(f"topk_sum: k must be >= 1, got {k}")
    v = _as_values(values)
    if v.size == 0:
        return 0.0
    return float(np.sort(v)[-k:].sum())


def aggregate(values: np.ndarray, method: Aggregation, k: int) -> float:
    """Per-image aggregation of per-region values, normalised to [0, 1]: mean, max, or topk_sum / k
    (fewer than k regions still divide by k: an image with more uncertain objects is worth more).
    """
    if method == "mean":
        out = mean(values)
    elif method == "max":
        out = maximum(values)
    elif method == "topk_sum":
        out = topk_sum(values, k) / k
    else:
        raise ValueError(f"aggregate: unknown method {method!r}, expected one of {AGGREGATIONS}")
    return float(np.clip(out, 0.0, 1.0))


def combine(components: Mapping[str, float], weights: Mapping[str, float]) -> float:
    """Weighted mean over the components that are present AND have weight > 0 (weights renormalised
    over those); nothing to combine -> 0.0; result clipped to [0, 1]. Negative weights -> ValueError
    naming the weight.

    Why renormalise: a component that does not apply (e.g. detection count for a classifier) must not
    drag the score toward 0.
    """
    for name, w in weights.items():
        if not math.isfinite(w) or w < 0:
            raise ValueError(f"combine: weight {name!r} must be a finite number >= 0, got {w}")
    total_w = 0.0
    acc = 0.0
    for name, value in components.items():
        w = weights.get(name, 0.0)
        if w <= 0:
            continue
        if not math.isfinite(value):
            raise ValueError(f"combine: component {name!r} is not finite: {value}")
        total_w += w
        acc += w * value
    if total_w == 0:
        return 0.0
    return float(np.clip(acc / total_w, 0.0, 1.0))


# --------------------------------------------------------------------------- per-image entry points


@dataclass(frozen=True)
class UncertaintyConfig:
    """How to turn per-region measures into one per-image value. Validated on construction so a typo in a
    weight name fails at start-up instead of silently contributing nothing."""

    weights: Mapping[str, float]  # keys are ComponentName values
    aggregation: Aggregation = "topk_sum"
    top_k: int = 10
    empty_floor: float = 0.5  # value for an image with no detection at all
    count_half_saturation: float = 5.0

    def __post_init__(self) -> None:
        unknown = sorted(set(self.weights) - set(COMPONENT_NAMES))
        if unknown:
            raise ValueError(
                f"UncertaintyConfig: unknown weight(s) {unknown}, expected among {COMPONENT_NAMES}"
            )
        for name, w in self.weights.items():
            if not math.isfinite(w) or w < 0:
                raise ValueError(f"UncertaintyConfig: weight {name!r} must be a finite number >= 0, got {w}")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"UncertaintyConfig: aggregation {self.aggregation!r} not in {AGGREGATIONS}")
        if self.top_k < 1:
            raise ValueError(f"UncertaintyConfig: top_k must be >= 1, got {self.top_k}")
        if not 0.0 <= self.empty_floor <= 1.0:
            raise ValueError(f"UncertaintyConfig: empty_floor must be in [0, 1], got {self.empty_floor}")
        if not (self.count_half_saturation > 0 and math.isfinite(self.count_half_saturation)):
            raise ValueError(
                f"UncertaintyConfig: count_half_saturation must be > 0, got {self.count_half_saturation}"
            )


@dataclass(frozen=True)
class ImageUncertainty:
    """One image's uncertainty, with its parts kept for logging and debugging the ranking."""

    value: float  # in [0, 1]
    components: dict[str, float]  # each component's per-image value (after aggregation)
    n_regions: int
    empty: bool  # True when there was no detection and the floor was used


def detection_uncertainty(
    class_scores: np.ndarray | None, confidences: np.ndarray, cfg: UncertaintyConfig
) -> ImageUncertainty:
    """class_scores: (n, k) pre-NMS class scores of the n kept regions, or None when the model does not
    expose them (end-to-end heads): then each region's distribution is taken as [conf, 1 - conf] (k=2).
    confidences: (n,). n == 0 -> value = cfg.empty_floor, empty=True, components {}.
    Per-region components least_confidence/entropy/margin are aggregated with cfg.aggregation/top_k;
    confidence_variance and detection_count are per-image. Then combine() with cfg.weights.

    A background ("no object") column 1 - conf is appended to every region's class scores before
    normalising, so low-confidence regions count as uncertain whatever their class ranking.

    Why a floor for empty images: "nothing found" at a low threshold may mean a miss, so such images
    should neither top nor bottom the queue.
    """
    conf = _as_values(confidences, "confidences")
    if np.any((conf < 0) | (conf > 1)):
        raise ValueError("confidences: values must be in [0, 1]")
    n = int(conf.size)
    scores: np.ndarray | None = None
    if class_scores is not None:
        scores = _as_float_array(class_scores, "class_scores")
        if scores.ndim != 2:
            raise ValueError(f"class_scores: expected shape (n, k), got {scores.shape}")
        if scores.shape[0] != n:
            raise ValueError(
                f"class_scores has {scores.shape[0]} rows but confidences has {n} values; "
                "they must describe the same regions"
            )
        if scores.shape[1] < 1:
            raise ValueError(f"class_scores: needs at least one class, got shape {scores.shape}")
    if n == 0:
        return ImageUncertainty(value=float(cfg.empty_floor), components={}, n_regions=0, empty=True)

    # Each region's distribution is its class scores plus "no object" (1 - conf): sigmoid class scores
    # normalised alone would make a weak box [0.1, 0, 0] look certain. Without class scores (end-to-end
    # heads) or with one class this is [conf, 1 - conf].
    classes = conf[:, None] if scores is None else scores
    dist = class_distribution(np.column_stack([classes, 1.0 - conf]))

    components: dict[str, float] = {
        "least_confidence": aggregate(least_confidence(dist), cfg.aggregation, cfg.top_k),
        "entropy": aggregate(entropy(dist), cfg.aggregation, cfg.top_k),
        "margin": aggregate(margin(dist), cfg.aggregation, cfg.top_k),
        "confidence_variance": confidence_variance(conf),
        "detection_count": detection_count(n, cfg.count_half_saturation),
    }
    return ImageUncertainty(
        value=combine(components, cfg.weights), components=components, n_regions=n, empty=False
    )


def classification_uncertainty(probs: np.ndarray, cfg: UncertaintyConfig) -> ImageUncertainty:
    """probs: (k,) softmax. least_confidence/entropy/margin on that one distribution; confidence_variance and
    detection_count do not apply (left out, so combine() renormalises the weights).
    """
    p = _as_values(probs, "probs")
    if p.size < 1:
        raise ValueError("probs: needs at least one class")
    # Renormalise defensively (float32 softmax rarely sums to exactly 1).
    dist = class_distribution(p)[None, :]
    components: dict[str, float] = {
        "least_confidence": float(least_confidence(dist)[0]),
        "entropy": float(entropy(dist)[0]),
        "margin": float(margin(dist)[0]),
    }
    return ImageUncertainty(
        value=combine(components, cfg.weights), components=components, n_regions=1, empty=False
    )


def task_score(uncertainty: float) -> float:
    """Label Studio's uncertainty sampling serves the LOWEST prediction score first, so
    score = 1 - uncertainty (clipped to [0, 1]).
    """
    if not math.isfinite(uncertainty):
        raise ValueError(f"task_score: uncertainty must be finite, got {uncertainty}")
    return float(min(1.0, max(0.0, 1.0 - uncertainty)))
