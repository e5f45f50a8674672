"""When to stop retraining: a per-project history of trainings and a decision over it.

Each training appends one row to ``MODEL_DIR/<project>/history.csv`` whether or not its candidate was promoted,
so the learning curve shows every attempt. The decision is pure logic over those rows.
"""

from __future__ import annotations

import csv
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

HISTORY_NAME = "history.csv"


@dataclass(frozen=True)
class HistoryRow:
    version: str
    promoted: bool
    labeled_tasks: int  # training + held-out tasks with annotations at this training
    heldout_map50: float
    heldout_map50_95: float
    train_map50: float | None  # the same metric on the training split, for the overfitting gap
    created_at: str


@dataclass(frozen=True)
class ConvergenceRules:
    target_map50: float | None = 0.95  # stop once reached; None: no target
    plateau_window: int = 3  # K: compare the best of the last K promoted versions ...
    plateau_min_gain: float = 0.005  # ... with the best before them; gaining less than this is a plateau
    max_overfit_gap: float | None = 0.25  # train minus held-out mAP50 above this: overfitting
    max_versions: int | None = 50  # trainings in all (promoted or not)


@dataclass(frozen=True)
class Decision:
    keep_training: bool
    reason: str


def history_path(model_dir: Path, project: str) -> Path:
    return Path(model_dir) / project / HISTORY_NAME


def append_row(path: Path, row: HistoryRow) -> None:
    """Append one row (header on first write); one write call so a crash never leaves half a row."""
    path.parent.mkdir(parents=True, exist_ok=True)
    names = [f.name for f in fields(HistoryRow)]
    new = not path.exists() or path.stat().st_size == 0
    values = asdict(row)
    line = ",".join("" if values[n] is None else str(values[n]) for n in names) + "\n"
    with open(path, "a") as f:
        f.write((",".join(names) + "\n" if new else "") + line)
        f.flush()
        os.fsync(f.fileno())


def read_history(path: Path) -> list[HistoryRow]:
    if not path.exists():
        return []
    rows = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            rows.append(
                HistoryRow(
                    version=r["version"],
                    promoted=r["promoted"] == "True",
                    labeled_tasks=int(r["labeled_tasks"]),
                    heldout_map50=float(r["heldout_map50"]),
                    heldout_map50_95=float(r["heldout_map50_95"]),
                    train_map50=float(r["train_map50"]) if r.get("train_map50") else None,
                    created_at=r["created_at"],
                )
            )
    return rows


def decide(history: list[HistoryRow], rules: ConvergenceRules) -> Decision:
    """Keep retraining unless the target is reached, the curve has flattened, the model overfits, or the
    version budget is spent; the reason is what `annoloop status` shows."""
    if not history:
        return Decision(True, "no training yet")
    promoted = [r for r in history if r.promoted]
    best = max((r.heldout_map50 for r in promoted), default=0.0)
    if rules.target_map50 is not None and best >= rules.target_map50:
        return Decision(False, f"target reached: held-out mAP50 {best:.3f} >= {rules.target_map50:.3f}")
    last = history[-1]
    if (
        rules.max_overfit_gap is not None
        and last.train_map50 is not None
        and last.train_map50 - last.heldout_map50 > rules.max_overfit_gap
    ):
        gap = last.train_map50 - last.heldout_map50
        return Decision(
            False, f"overfitting: train mAP50 exceeds held-out by {gap:.3f} > {rules.max_overfit_gap:.3f}"
        )
    k = rules.plateau_window
    if len(history) > k:
        before = max((r.heldout_map50 for r in history[:-k]), default=0.0)
        recent = max(r.heldout_map50 for r in history[-k:])
        if recent - before < rules.plateau_min_gain:
            return Decision(
                False,
                f"plateau: the last {k} trainings gained {recent - before:+.3f} mAP50 (< {rules.plateau_min_gain})",
            )
    if rules.max_versions is not None and len(history) >= rules.max_versions:
        return Decision(False, f"version budget spent: {len(history)} trainings (max {rules.max_versions})")
    return Decision(True, f"improving: best held-out mAP50 {best:.3f}")
