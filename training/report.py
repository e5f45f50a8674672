"""`annoloop report`: the learning curve as a PNG and the history as a markdown table."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt

from training.convergence import HistoryRow, prelabel_summary

__all__ = ["history_table", "prelabel_summary", "write_report"]


def _rate(value: float | None) -> str:
    return f"{value:.0%}" if value is not None else "-"


def history_table(rows: list[HistoryRow]) -> str:
    """One line per training. The pre-label columns are about the version served before that training:
    how many of its pre-labels annotators reviewed, and the shares they kept / corrected / deleted, and how
    many regions they drew that it had missed."""
    head = (
        "| version | promoted | labeled tasks | held-out mAP50 | held-out mAP50-95 | train mAP50 "
        "| pre-labels of | reviewed | kept | corrected | deleted | drawn | created |"
    )
    lines = [head, "|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        train = f"{r.train_map50:.3f}" if r.train_map50 is not None else "-"
        n = r.prelabel_predicted

        def share(k: int | None, n: int | None = n) -> str:
            return _rate(k / n if n and k is not None else None)

        lines.append(
            f"| {r.version} | {'yes' if r.promoted else 'no'} | {r.labeled_tasks} | {r.heldout_map50:.3f} "
            f"| {r.heldout_map50_95:.3f} | {train} | {r.prelabel_version or '-'} "
            f"| {n if n is not None else '-'} | {share(r.prelabel_accepted)} | {share(r.prelabel_corrected)} "
            f"| {share(r.prelabel_rejected)} | {r.prelabel_added if r.prelabel_added is not None else '-'} "
            f"| {r.created_at} |"
        )
    return "\n".join(lines) + "\n"


def write_report(rows: list[HistoryRow], out_dir: Path, project: str) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    png, md = out_dir / f"learning-curve-{project}.png", out_dir / f"history-{project}.md"
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    x = [r.labeled_tasks for r in rows]
    ax.plot(x, [r.heldout_map50 for r in rows], "o-", label="held-out mAP50")
    ax.plot(x, [r.heldout_map50_95 for r in rows], "s--", label="held-out mAP50-95")
    if any(r.train_map50 is not None for r in rows):
        ax.plot(
            [r.labeled_tasks for r in rows if r.train_map50 is not None],
            [r.train_map50 for r in rows if r.train_map50 is not None],
            ":",
            color="grey",
            label="train mAP50",
        )
    reviewed = [r for r in rows if r.prelabel_acceptance is not None]
    if reviewed:
        ax.plot(
            [r.labeled_tasks for r in reviewed],
            [r.prelabel_acceptance for r in reviewed],
            "^-.",
            color="green",
            label="pre-labels kept (served version)",
        )
    rejected = [r for r in rows if not r.promoted]
    if rejected:
        ax.scatter(
            [r.labeled_tasks for r in rejected],
            [r.heldout_map50 for r in rejected],
            marker="x",
            color="red",
            zorder=3,
            label="not promoted",
        )
    ax.set_xlabel("labeled tasks")
    ax.set_ylabel("metric")
    ax.set_ylim(0, 1)
    ax.set_title(f"project {project}: learning curve")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    md.write_text(f"# Project {project}: training history\n\n" + history_table(rows))
    return png, md
