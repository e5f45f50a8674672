"""Order a project's unlabeled pool so that annotators label the most useful task next.

Labelling the most uncertain images alone wastes effort: a detector is unsure about whole families of
near-identical frames (a video, a burst), and the top of an uncertainty list is often twenty copies of one
scene. Diversity alone (cold start) ignores what the model already knows. So ``rank`` mixes the two, and
keeps a little randomness so the ranking cannot lock itself into one corner of the data.

Algorithm of ``rank`` (pure numpy, deterministic for a seed):

1. Priority. ``u`` = uncertainty turned into percentile ranks in [0, 1] (ties share their mean rank), so
   only the order of the scores matters, not their scale or calibration. ``rare_i`` = the largest
   ``class_rarity`` among the classes predicted in image ``i`` (0 when none is predicted). priority =
   (w_u * u + w_c * rare) / (w_u + w_c), counting only the terms whose inputs are given, so it lies in
   [0, 1]. Cold start (no uncertainty): the rare term alone, or zeros without class predictions.
2. Head batches. For each of ``diverse_batches`` batches, ``batch_size - n_explore`` entries are chosen by
   ``selection``: ``priority`` (the default) takes the highest-priority remaining entries; ``kcenter``
   takes them by k-center greedy (farthest-first) among the top ``candidate_multiplier x batch_size``
   remaining entries by priority, covered points being the labeled set plus everything picked so far,
   which spreads a batch over distinct embeddings and away from what is already labeled. Cold start (no
   uncertainty) always uses k-center over every remaining entry, as diversity is then the only signal.
   ``n_explore = round(exploration_fraction * batch_size)`` entries are drawn uniformly at random from the
   rest of the remaining pool (not only the candidates, so low-priority regions get a chance to prove the
   priority wrong) and put at random places in the batch. A last, partial batch uses round(fraction x its
   size); ``round`` is Python's (half to even). Within a batch the k-center picks keep their farthest-first
   order; with nothing covered yet the first is the highest-priority candidate (cold start: the one
   nearest the pool mean), and equal distances also go to higher priority, then nearness to the mean.
   Why ``priority`` is the default: in the label-efficiency benchmark (bench/label_efficiency.py) the
   pooled backbone embedding of a small detector is nearly one-dimensional (one direction held 93% of the
   variance on the generated set; a near-duplicate frame was no closer than another scene), so k-center
   on it picked extremes of that direction, skipped the dark shifted domain and lowered the share of
   real errors in the batches; priority order alone did better (see the README's figures).
3. Tail. The rest follows by priority descending; at cold start by squared distance to the nearest
   labeled or picked point, descending, so coverage goes on. Ties go to the smaller task id.
4. Clusters. ``cluster`` = k-means labels of the (L2-normalised) pool embeddings, for reporting and
   per-cluster quotas downstream; it does not change the order.

Embeddings are L2-normalised first (a zero vector stays zero), so squared distances lie in [0, 4] and do
not depend on the scale of the embedding model. k-center never builds an n x n matrix: it keeps, per
entry, the squared distance to the nearest covered point and updates it after each pick, O(k * n * d).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

# Distances within this relative gap of the maximum count as tied, so that exact geometric ties (equidistant
# points) are broken by priority and not by floating-point noise from the matmul used for the labeled set.
_TIE_RTOL = 1e-9
# Elements per temporary matrix in chunked distance computations (8 MiB of float64).
_CHUNK_ELEMS = 1 << 20

SOURCE_KCENTER = "k-center"
SOURCE_EXPLORE = "explore"
SOURCE_PRIORITY = "priority"


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class RankingConfig:
    """Knobs of ``rank``. Defaults suit batches of a few dozen tasks per annotation round."""

    uncertainty_weight: float = 1.0
    class_balance_weight: float = 0.5
    candidate_multiplier: int = 4
    batch_size: int = 20
    diverse_batches: int = 3
    exploration_fraction: float = 0.1
    clusters: int = 8
    seed: int = 0
    selection: Literal["priority", "kcenter"] = "priority"

    def __post_init__(self) -> None:
        if self.selection not in ("priority", "kcenter"):
            raise ValueError(
                f"RankingConfig: selection must be 'priority' or 'kcenter', got {self.selection!r}"
            )
        if self.uncertainty_weight < 0 or self.class_balance_weight < 0:
            raise ValueError("RankingConfig: weights must be >= 0")
        if self.candidate_multiplier < 1:
            raise ValueError("RankingConfig: candidate_multiplier must be >= 1")
        if self.batch_size < 1:
            raise ValueError("RankingConfig: batch_size must be >= 1")
        if self.diverse_batches < 0:
            raise ValueError("RankingConfig: diverse_batches must be >= 0")
        if not 0.0 <= self.exploration_fraction <= 1.0:
            raise ValueError("RankingConfig: exploration_fraction must be in [0, 1]")
        if self.clusters < 1:
            raise ValueError("RankingConfig: clusters must be >= 1")


@dataclass
class Pool:
    """The unlabeled tasks to rank. ``uncertainty`` None means no model yet (cold start)."""

    ids: np.ndarray
    embeddings: np.ndarray
    uncertainty: np.ndarray | None = None
    class_presence: np.ndarray | None = None


@dataclass
class Labeled:
    """What is already labeled: its embeddings (to stay away from) and box counts per class."""

    embeddings: np.ndarray
    class_counts: np.ndarray | None = None


@dataclass
class Ranking:
    """Result of ``rank``. Everything except ``order`` is indexed like the pool."""

    order: np.ndarray
    cluster: np.ndarray
    priority: np.ndarray
    source: np.ndarray

    def scores(self) -> np.ndarray:
        """Place in the order scaled to [0, 1] per pool entry, 0 = label first.

        Label Studio sorts tasks by a number, not by a list; this is that number.
        """
        n = len(self.order)
        out = np.zeros(n, dtype=np.float64)
        if n > 1:
            out[self.order] = np.arange(n, dtype=np.float64) / (n - 1)
        return out


# --------------------------------------------------------------------------- helpers


def _as_matrix(x: object, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim == 1 and arr.size == 0:
        arr = arr.reshape(0, 0)
    if arr.ndim != 2:
        raise ValueError(f"{name}: expected shape (n, d), got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name}: contains NaN or infinite values")
    return arr


def _l2_normalise(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    # A zero vector has no direction; leaving it at the origin avoids 0/0 and keeps it equidistant-ish.
    return x / np.where(norms > 0, norms, 1.0)


def _percentile_ranks(values: np.ndarray) -> np.ndarray:
    """Mean rank of each value scaled to [0, 1]; all-tied (or a single value) gives 0.5 everywhere."""
    n = len(values)
    if n == 0:
        return np.zeros(0, dtype=np.float64)
    if n == 1:
        return np.full(1, 0.5)
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    starts = np.cumsum(counts) - counts
    mean_rank = starts + (counts - 1) / 2.0
    return mean_rank[inverse] / (n - 1)


def _min_sq_dist(x: np.ndarray, anchors: np.ndarray) -> np.ndarray:
    """(n,) squared distance from each row of x to its nearest anchor (inf without anchors), chunked."""
    out = np.full(len(x), np.inf)
    if len(anchors) == 0 or len(x) == 0:
        return out
    xx = np.einsum("ij,ij->i", x, x)
    step = max(1, _CHUNK_ELEMS // max(1, len(x)))
    for s in range(0, len(anchors), step):
        a = anchors[s : s + step]
        aa = np.einsum("ij,ij->i", a, a)
        d = xx[:, None] - 2.0 * (x @ a.T) + aa[None, :]
        np.minimum(out, d.min(axis=1), out=out)
    # The expansion can go slightly negative by cancellation.
    return np.maximum(out, 0.0)


def _cover_with(x: np.ndarray, cover: np.ndarray, point: np.ndarray) -> None:
    """Fold a newly covered point into ``cover`` in place. Exact differences, so duplicates get exactly 0."""
    diff = x - point
    np.minimum(cover, np.einsum("ij,ij->i", diff, diff), out=cover)


def _farthest_first(
    x: np.ndarray, k: int, cover: np.ndarray, tie_rank: np.ndarray, allowed: np.ndarray
) -> list[int]:
    """Greedy k-center among ``allowed`` rows; updates ``cover`` (whole pool) in place.

    ``tie_rank`` (smaller = preferred) breaks distance ties and chooses the first point when nothing is
    covered yet. Duplicates of a covered point have distance 0, so they only come once every distinct
    point is covered.
    """
    avail = allowed.copy()
    picks: list[int] = []
    for _ in range(min(k, int(avail.sum()))):
        idx = np.flatnonzero(avail)
        d = cover[idx]
        top = d.max()
        tied = idx if np.isinf(top) else idx[d >= top * (1.0 - _TIE_RTOL)]
        j = int(tied[np.argmin(tie_rank[tied])])
        picks.append(j)
        avail[j] = False
        _cover_with(x, cover, x[j])
    return picks


def _rank_of(order: np.ndarray) -> np.ndarray:
    """Inverse permutation: position of each entry in ``order``."""
    pos = np.empty(len(order), dtype=np.intp)
    pos[order] = np.arange(len(order))
    return pos


# --------------------------------------------------------------------------- public building blocks


def class_rarity(class_counts: np.ndarray | None, n_classes: int) -> np.ndarray:
    """(C,) in [0, 1], 1 = rarest class: 1 / sqrt(1 + labeled boxes), divided by its max.

    The square root softens the push: a class with 100x fewer boxes is favoured 10x, not 100x, so a
    single never-labeled class cannot take over the whole batch.
    """
    if n_classes < 0:
        raise ValueError(f"n_classes must be >= 0, got {n_classes}")
    if class_counts is None:
        return np.ones(n_classes)
    counts = np.asarray(class_counts, dtype=np.float64)
    if counts.shape != (n_classes,):
        raise ValueError(f"class_counts: expected shape ({n_classes},), got {counts.shape}")
    if not np.all(np.isfinite(counts)) or np.any(counts < 0):
        raise ValueError("class_counts: must be finite and >= 0")
    if not counts.any():
        return np.ones(n_classes)
    raw = 1.0 / np.sqrt(1.0 + counts)
    return raw / raw.max()


def kcenter_greedy(embeddings: np.ndarray, k: int, anchors: np.ndarray | None = None) -> list[int]:
    """Farthest-first traversal: each pick is the point farthest from everything covered so far.

    ``anchors`` are already covered (e.g. the labeled set). Without anchors the first pick is the point
    nearest the mean, a typical example rather than an outlier. Distance ties go to the lower index.
    Returns min(k, n) distinct indices; memory O(n * d), never an n x n matrix.
    """
    x = _as_matrix(embeddings, "embeddings")
    n = len(x)
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    if n == 0 or k == 0:
        return []
    # Centring loses nothing (distances are translation-invariant) and keeps the matmul expansion used
    # against the anchors accurate for data far from the origin.
    shift = x.mean(axis=0)
    x = x - shift
    cover = np.full(n, np.inf)
    if anchors is not None:
        a = _as_matrix(anchors, "anchors")
        if len(a):
            if a.shape[1] != x.shape[1]:
                raise ValueError(f"anchors: dimension {a.shape[1]} != embeddings dimension {x.shape[1]}")
            cover = _min_sq_dist(x, a - shift)
    centrality = np.einsum("ij,ij->i", x, x)
    tie_rank = _rank_of(np.lexsort((np.arange(n), centrality)))
    return _farthest_first(x, k, cover, tie_rank, np.ones(n, dtype=bool))


def _assign(x: np.ndarray, xx: np.ndarray, centers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest center per row and its squared distance, in row chunks of bounded size."""
    n, k = len(x), len(centers)
    labels = np.empty(n, dtype=np.intp)
    dist = np.empty(n)
    cc = np.einsum("ij,ij->i", centers, centers)
    step = max(1, _CHUNK_ELEMS // max(1, k))
    for s in range(0, n, step):
        d = xx[s : s + step, None] - 2.0 * (x[s : s + step] @ centers.T) + cc[None, :]
        labels[s : s + step] = d.argmin(axis=1)
        dist[s : s + step] = d[np.arange(len(d)), labels[s : s + step]]
    return labels, np.maximum(dist, 0.0)


def kmeans(x: np.ndarray, k: int, seed: int = 0, iters: int = 25) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's k-means with k-means++ seeding. Returns (labels (n,), centers (k', d)).

    k' = min(k, number of distinct points): asking for more clusters than distinct points would leave
    duplicate centers and empty clusters. Deterministic for a seed; memory O(n * k + n * d).
    """
    data = _as_matrix(x, "x")
    n, d = data.shape
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if n == 0:
        return np.zeros(0, dtype=np.intp), np.zeros((0, d))
    # Centred copy: the distance expansion in _assign then cancels far less for data far from the origin.
    shift = data.mean(axis=0)
    data = data - shift
    k = min(k, len(np.unique(data, axis=0)))
    rng = np.random.default_rng(seed)

    # k-means++: sample proportionally to squared distance to the nearest chosen center. Exact
    # differences make duplicates of a chosen center exactly 0, so they are never sampled.
    chosen = [int(rng.integers(n))]
    near = np.full(n, np.inf)
    _cover_with(data, near, data[chosen[0]])
    while len(chosen) < k:
        cum = np.cumsum(near)
        j = int(np.searchsorted(cum, rng.random() * cum[-1], side="right"))
        chosen.append(j)
        _cover_with(data, near, data[j])
    centers = data[chosen].copy()

    xx = np.einsum("ij,ij->i", data, data)
    labels, dist = _assign(data, xx, centers)
    for _ in range(iters):
        counts = np.bincount(labels, minlength=k)
        sums = np.stack([np.bincount(labels, weights=data[:, c], minlength=k) for c in range(d)], axis=1)
        nonempty = counts > 0
        centers[nonempty] = sums[nonempty] / counts[nonempty, None]
        # An empty cluster moves to the worst-served point, as in most k-means implementations.
        far = dist.copy()
        for c in np.flatnonzero(~nonempty):
            j = int(far.argmax())
            if far[j] <= 0:
                break
            centers[c] = data[j]
            _cover_with(data, far, data[j])
        new_labels, dist = _assign(data, xx, centers)
        if np.array_equal(new_labels, labels):
            break
        labels = new_labels
    return labels, centers + shift


# --------------------------------------------------------------------------- rank


def _rare_term(presence: np.ndarray, rarity: np.ndarray) -> np.ndarray:
    if presence.shape[1] == 0:
        return np.zeros(len(presence))
    return np.where(presence > 0, rarity[None, :], 0.0).max(axis=1, initial=0.0)


def _priority(
    n: int, u: np.ndarray | None, presence: np.ndarray | None, labeled: Labeled, cfg: RankingConfig
) -> np.ndarray:
    """Weighted mean of the terms whose inputs exist, so it stays in [0, 1] whatever is missing."""
    total = np.zeros(n)
    weight = 0.0
    if u is not None and cfg.uncertainty_weight > 0:
        total += cfg.uncertainty_weight * _percentile_ranks(u)
        weight += cfg.uncertainty_weight
    if presence is not None and cfg.class_balance_weight > 0:
        rarity = class_rarity(labeled.class_counts, presence.shape[1])
        total += cfg.class_balance_weight * _rare_term(presence, rarity)
        weight += cfg.class_balance_weight
    return total / weight if weight > 0 else total


def rank(pool: Pool, labeled: Labeled, cfg: RankingConfig) -> Ranking:
    """Order the pool (see the module docstring for the algorithm)."""
    ids = np.asarray(pool.ids)
    n = len(ids)
    if ids.ndim != 1:
        raise ValueError(f"pool.ids: expected shape (n,), got {ids.shape}")
    emb = _as_matrix(pool.embeddings, "pool.embeddings")
    if n == 0:
        return Ranking(
            order=np.zeros(0, dtype=np.intp),
            cluster=np.zeros(0, dtype=np.intp),
            priority=np.zeros(0),
            source=np.zeros(0, dtype="<U8"),
        )
    if len(emb) != n:
        raise ValueError(f"pool.embeddings: {len(emb)} rows for {n} ids")
    emb = _l2_normalise(emb)

    u = None
    if pool.uncertainty is not None:
        u = np.asarray(pool.uncertainty, dtype=np.float64)
        if u.shape != (n,) or not np.all(np.isfinite(u)):
            raise ValueError(f"pool.uncertainty: expected {n} finite values, got shape {u.shape}")
    presence = None
    if pool.class_presence is not None:
        presence = _as_matrix(pool.class_presence, "pool.class_presence")
        if len(presence) != n or np.any(presence < 0):
            raise ValueError(f"pool.class_presence: expected ({n}, C) values >= 0, got {presence.shape}")
    cold = u is None
    priority = _priority(n, u, presence, labeled, cfg)

    lab = _as_matrix(labeled.embeddings, "labeled.embeddings")
    if len(lab) and lab.shape[1] != emb.shape[1]:
        raise ValueError(f"labeled.embeddings: dimension {lab.shape[1]} != pool dimension {emb.shape[1]}")
    cover = _min_sq_dist(emb, _l2_normalise(lab)) if len(lab) else np.full(n, np.inf)

    index = np.arange(n)
    # Candidate and tail order: priority descending, then id, then position (duplicate ids).
    by_priority = np.lexsort((index, ids, -priority))
    # k-center tie-break: priority, then nearness to the pool mean (typical before odd), then id.
    centrality = _min_sq_dist(emb, emb.mean(axis=0, keepdims=True))
    kc_tie_rank = _rank_of(np.lexsort((index, ids, centrality, -priority)))

    rng = np.random.default_rng(cfg.seed)
    avail = np.ones(n, dtype=bool)
    source = np.full(n, SOURCE_PRIORITY, dtype="<U8")
    order: list[int] = []
    for _ in range(cfg.diverse_batches):
        remaining = int(avail.sum())
        if remaining == 0:
            break
        batch_len = min(cfg.batch_size, remaining)
        n_explore = round(cfg.exploration_fraction * batch_len)
        if not cold and cfg.selection == "priority":
            kc = by_priority[avail[by_priority]][: batch_len - n_explore].tolist()
            for j in kc:
                _cover_with(emb, cover, emb[j])
        else:
            if cold:
                candidates = avail
            else:
                top = by_priority[avail[by_priority]][: cfg.candidate_multiplier * cfg.batch_size]
                candidates = np.zeros(n, dtype=bool)
                candidates[top] = True
            kc = _farthest_first(emb, batch_len - n_explore, cover, kc_tie_rank, candidates)
        avail[kc] = False

        # Exploration draws from everything still unpicked, not only the candidates.
        rest = np.flatnonzero(avail)
        explore = rng.choice(rest, size=min(n_explore, len(rest)), replace=False).tolist()
        for j in explore:
            _cover_with(emb, cover, emb[j])
        avail[explore] = False
        source[kc] = SOURCE_KCENTER if cold or cfg.selection == "kcenter" else SOURCE_PRIORITY
        source[explore] = SOURCE_EXPLORE

        batch = np.empty(len(kc) + len(explore), dtype=np.intp)
        slots = np.zeros(len(batch), dtype=bool)
        slots[rng.choice(len(batch), size=len(explore), replace=False)] = True
        batch[slots] = explore
        batch[~slots] = kc
        order.extend(batch.tolist())

    rest = np.flatnonzero(avail)
    if cold:
        # Farther from everything labeled or picked first; -inf everywhere (nothing covered) leaves priority.
        tail = rest[np.lexsort((rest, ids[rest], -priority[rest], -cover[rest]))]
    else:
        tail = by_priority[avail[by_priority]]
    order.extend(tail.tolist())

    labels, _ = kmeans(emb, min(cfg.clusters, n), seed=cfg.seed)
    return Ranking(
        order=np.asarray(order, dtype=np.intp),
        cluster=labels.astype(np.intp),
        priority=priority,
        source=source,
    )
