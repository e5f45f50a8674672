"""The sync's picture: how uncertain the pool is, and what the head of the queue is made of."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
import numpy as np

if TYPE_CHECKING:
    from sync.job import SyncSummary
    from sync.ranking import Ranking
    from sync.score_cache import Scored


def plot_sync(path: Path, pool: list[Scored], ranking: Ranking, summary: SyncSummary) -> Path:
    """Three panels: uncertainty of the pool vs the queue's head, labels and clusters in the head vs the pool."""
    path = path if path.suffix == ".png" else path / f"sync-project-{summary.project}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    head_n = max(1, len(summary.top) and sum(summary.queue_clusters.values()))
    head = ranking.order[:head_n]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))

    ax = axes[0]
    u = np.array([r.uncertainty for r in pool if r.uncertainty is not None], dtype=float)
    if len(u):
        bins = np.linspace(0, 1, 26)
        ax.hist(u, bins=bins, alpha=0.6, label=f"pool ({len(u)})")
        hu = np.array([pool[i].uncertainty for i in head if pool[i].uncertainty is not None], dtype=float)
        ax.hist(hu, bins=bins, alpha=0.8, label=f"next {len(hu)} in queue")
        ax.legend()
    else:
        ax.text(0.5, 0.5, "cold start: no model,\nranked by diversity only", ha="center", va="center")
    ax.set(title="task uncertainty", xlabel="uncertainty", ylabel="tasks")

    def shares(counter: Counter, keys: list) -> np.ndarray:
        total = sum(counter.values()) or 1
        return np.array([counter.get(k, 0) / total for k in keys])

    pool_labels: Counter[str] = Counter()
    for r in pool:
        pool_labels.update(r.labels)
    head_labels = Counter(summary.queue_labels)
    keys = sorted(set(pool_labels) | set(head_labels))
    x = np.arange(len(keys))
    ax = axes[1]
    if keys:
        ax.bar(x - 0.2, shares(pool_labels, keys), 0.4, label="pool")
        ax.bar(x + 0.2, shares(head_labels, keys), 0.4, label="queue head")
        ax.set_xticks(x, keys, rotation=30, ha="right")
        ax.legend()
    ax.set(title="predicted regions by label (share)", ylabel="share of regions")

    pool_clusters = Counter(ranking.cluster.tolist())
    head_clusters = Counter(ranking.cluster[head].tolist())
    ckeys = sorted(pool_clusters)
    x = np.arange(len(ckeys))
    ax = axes[2]
    ax.bar(x - 0.2, shares(pool_clusters, ckeys), 0.4, label="pool")
    ax.bar(x + 0.2, shares(head_clusters, ckeys), 0.4, label="queue head")
    ax.set_xticks(x, [str(k) for k in ckeys])
    ax.set(title="diversity clusters (share of tasks)", xlabel="cluster")
    ax.legend()

    fig.suptitle(f"project {summary.project}: sync with {summary.model_version}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
