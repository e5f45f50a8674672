"""When to stop retraining: the per-project training history and a decision over it.

The history is ONE file, ``MODEL_DIR/<project>/history.csv``: a row per training (promoted or not), appended
by the training job (:func:`training.jobs.run_training`) under the project's training lock. It is both the
tracking table users open and plot (``annoloop report``) and the attempt log the job reads to skip a retrain
when nothing changed (``data_fingerprint`` of the last row).

Why one CSV and not a CSV plus a JSONL attempt log (as before): two files written at two moments could
disagree (a run outside the queue wrote only the log; a crash between the writes left one without the other),
and every fact the log had fits a column. CSV rather than JSONL because the issue asks for a tracking CSV
that opens in any spreadsheet; the job's free-text reason is quoted by :mod:`csv`.

Old files stay readable: a CSV with fewer columns reads with the missing ones empty and is rewritten with
the full header on the next append; a legacy ``history.jsonl`` beside it is merged in when reading and
folded into the CSV by :func:`migrate_legacy_history` (then renamed ``history.jsonl.migrated``).

The decision (:func:`decide`) is pure logic over the rows.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

HISTORY_NAME = "history.csv"
#: The attempt log earlier versions kept beside the CSV (read and migrated, never written).
LEGACY_JSONL_NAME = "history.jsonl"


@dataclass(frozen=True)
class HistoryRow:
    """One training: its held-out and training-split scores, what it was compared with, and what annotators
    did to the pre-labels of the version served before it."""

    version: str
    promoted: bool
    labeled_tasks: int  # training + held-out tasks with annotations at this training
    heldout_map50: float
    heldout_map50_95: float
    train_map50: float | None  # the same metric on (a sample of) the training split, for the overfitting gap
    created_at: str
    parent: str = ""  # "<project>/<version>" the candidate was fine-tuned from and compared with
    metric: str = ""  # the promotion metric ...
    candidate: float | None = None  # ... the candidate's value ...
    current: float | None = None  # ... and the served model's, on the same held-out tasks
    data_fingerprint: str = ""  # annotations + config + settings: equal means a retrain would change nothing
    prelabel_version: str = ""  # the model version served before this training, whose pre-labels ...
    prelabel_predicted: int | None = None  # ... annotators reviewed (regions) ...
    prelabel_accepted: int | None = None  # ... kept ...
    prelabel_corrected: int | None = None  # ... relabeled or moved ...
    prelabel_rejected: int | None = None  # ... deleted ...
    prelabel_added: int | None = None  # ... and how many regions they drew that it missed
    prelabel_acceptance: float | None = None  # accepted / predicted
    holdout_tasks: int | None = None  # held-out tasks behind the scores (None: rows from before the count)
    reason: str = ""  # why promoted or not, in words
    model_card: str = ""  # path of the version's (or rejected candidate's) metadata.json


COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(HistoryRow))
_BOOL = {"promoted"}
_INT = {"labeled_tasks"}
_OPT_INT = {
    "holdout_tasks",
    "prelabel_predicted",
    "prelabel_accepted",
    "prelabel_corrected",
    "prelabel_rejected",
    "prelabel_added",
}
_FLOAT = {"heldout_map50", "heldout_map50_95"}
_OPT_FLOAT = {"train_map50", "candidate", "current", "prelabel_acceptance"}


@dataclass(frozen=True)
class ConvergenceRules:
    target_map50: float | None = 0.95  # stop once reached; None: no target
    plateau_window: int = 3  # K: compare the best of the last K promoted versions ...
    plateau_min_gain: float = 0.005  # ... with the best before them; gaining less than this is a plateau
    max_overfit_gap: float | None = 0.25  # train minus held-out mAP50 above this: overfitting
    max_versions: int | None = 50  # trainings in all (promoted or not)
    min_holdout_tasks: int = 20  # the other rules judge only trainings scored on at least this many tasks


@dataclass(frozen=True)
class Decision:
    keep_training: bool
    reason: str


def history_path(model_dir: Path, project: str) -> Path:
    return Path(model_dir) / project / HISTORY_NAME


# --- reading -------------------------------------------------------------------------------------------


def _parse(name: str, text: str | None) -> Any:
    text = (text or "").strip()
    if name in _BOOL:
        return text == "True"
    if name in _INT:
        return int(float(text)) if text else 0
    if name in _FLOAT:
        return float(text) if text else 0.0
    if name in _OPT_INT:
        return int(float(text)) if text else None
    if name in _OPT_FLOAT:
        return float(text) if text else None
    return text


def _row_from_csv(record: dict[str, str | None]) -> HistoryRow:
    return HistoryRow(**{name: _parse(name, record.get(name)) for name in COLUMNS})


def _read_csv(path: Path) -> list[HistoryRow]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    rows = []
    for i, record in enumerate(csv.DictReader(io.StringIO(text, newline=""))):
        try:
            rows.append(_row_from_csv(record))
        except (TypeError, ValueError):  # a line being appended right now, or edited by hand
            log.warning("unreadable history row skipped", extra={"path": str(path), "row": i + 1})
    return rows


def _legacy_entries(path: Path) -> list[dict[str, Any]]:
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return []
    out = []
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("version"):
            out.append(entry)
    return out


def _from_legacy(entry: dict[str, Any], row: HistoryRow | None) -> HistoryRow:
    """A row for one attempt of the old JSONL log, completed from its CSV row (if the queue wrote one) or
    from its model card (held-out scores, task counts)."""
    parent = entry.get("parent") if isinstance(entry.get("parent"), dict) else None
    extra = {
        "parent": f"{parent['project']}/{parent['version']}" if parent else "",
        "metric": str(entry.get("metric") or ""),
        "candidate": entry.get("candidate"),
        "current": entry.get("current"),
        "data_fingerprint": str(entry.get("data_fingerprint") or ""),
        "reason": "; ".join(entry.get("reasons") or []),
        "model_card": str(entry.get("model_card") or ""),
    }
    if row is not None:
        return replace(row, **{k: v for k, v in extra.items() if not getattr(row, k)})
    card: dict[str, Any] = {}
    try:
        card = json.loads(Path(extra["model_card"]).read_text()) if extra["model_card"] else {}
    except (OSError, ValueError):
        card = {}
    overall = ((card.get("metrics") or {}).get("candidate") or {}).get("overall") or {}
    ids = card.get("task_ids") or {}
    return HistoryRow(
        version=str(entry["version"]),
        promoted=bool(entry.get("promoted")),
        labeled_tasks=len(ids.get("train") or []) + len(ids.get("holdout") or []),
        heldout_map50=float(overall.get("mAP50") or 0.0),
        heldout_map50_95=float(overall.get("mAP50-95") or 0.0),
        train_map50=None,
        created_at=str(entry.get("created_at") or ""),
        **extra,
    )


def read_history(path: Path) -> list[HistoryRow]:
    """Every training of the project, oldest first; a legacy ``history.jsonl`` beside ``path`` is merged in."""
    rows = _read_csv(Path(path))
    legacy = _legacy_entries(Path(path).parent / LEGACY_JSONL_NAME)
    if not legacy:
        return rows
    by_version = {r.version: r for r in rows}
    merged = [_from_legacy(e, by_version.get(str(e["version"]))) for e in legacy]
    seen = {r.version for r in merged}
    return merged + [r for r in rows if r.version not in seen]


# --- writing (the training job, under the project lock) ---------------------------------------------------


def _line(values: list[Any]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow(values)
    return buf.getvalue()


def _encode(row: HistoryRow) -> list[Any]:
    return ["" if v is None else v for v in asdict(row).values()]


def _write_all(path: Path, rows: list[HistoryRow]) -> None:
    """Replace the file with ``rows`` under the current header, atomically (readers see old or new)."""
    from annoloop.model_store import atomic_write_text

    atomic_write_text(path, _line(list(COLUMNS)) + "".join(_line(_encode(r)) for r in rows))


def _header(path: Path) -> list[str] | None:
    try:
        with open(path, newline="") as f:
            return next(csv.reader(f), None)
    except FileNotFoundError:
        return None


def migrate_legacy_history(project_dir: Path) -> bool:
    """Fold a legacy ``history.jsonl`` into ``history.csv`` (then rename it ``history.jsonl.migrated``).

    Call with the project's training lock held. Returns whether there was anything to migrate.
    """
    legacy = Path(project_dir) / LEGACY_JSONL_NAME
    if not legacy.exists():
        return False
    path = Path(project_dir) / HISTORY_NAME
    rows = read_history(path)
    _write_all(path, rows)
    os.replace(legacy, legacy.with_name(LEGACY_JSONL_NAME + ".migrated"))
    log.info("training history migrated", extra={"path": str(path), "rows": len(rows)})
    return True


def append_row(path: Path, row: HistoryRow) -> None:
    """Append one row (header on first write); one write call so a crash never leaves half a row.

    A file written by an older version (another header) is first rewritten with the current header, so that
    every row of a file has the same columns.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = _header(path)
    if header is not None and header != list(COLUMNS):
        _write_all(path, [*_read_csv(path), row])
        return
    text = (_line(list(COLUMNS)) if header is None else "") + _line(_encode(row))
    with open(path, "a") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def last_row(path: Path) -> HistoryRow | None:
    rows = read_history(path)
    return rows[-1] if rows else None


def prelabel_summary(row: HistoryRow) -> str:
    """``v001: 20 pre-labels, 60% kept, 25% corrected, 15% deleted; 4 drawn by annotators`` ('' without a
    review): what annotators did to the pre-labels of the version served before the row's training."""
    n = row.prelabel_predicted
    if not row.prelabel_version or n is None:
        return ""

    def share(k: int | None) -> str:
        return f"{k / n:.0%}" if n and k is not None else "-"

    return (
        f"{row.prelabel_version}: {n} pre-labels, {share(row.prelabel_accepted)} kept, "
        f"{share(row.prelabel_corrected)} corrected, {share(row.prelabel_rejected)} deleted; "
        f"{row.prelabel_added or 0} drawn by annotators"
    )


# --- the decision --------------------------------------------------------------------------------------


def decide(history: list[HistoryRow], rules: ConvergenceRules) -> Decision:
    """Keep retraining unless the target is reached, the curve has flattened, the model overfits, or the
    version budget is spent; the reason is what `annoloop status` shows."""
    if not history:
        return Decision(True, "no training yet")
    if rules.max_versions is not None and len(history) >= rules.max_versions:
        return Decision(False, f"version budget spent: {len(history)} trainings (max {rules.max_versions})")
    # A held-out set of a few tasks scores 0.99 or 0.5 by chance: such trainings stop nothing. Rows written
    # before the count was recorded (None) are judged as they were.
    history = [r for r in history if r.holdout_tasks is None or r.holdout_tasks >= rules.min_holdout_tasks]
    if not history:
        return Decision(True, f"too few held-out tasks to judge yet (fewer than {rules.min_holdout_tasks})")
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
    return Decision(True, f"improving: best held-out mAP50 {best:.3f}")
