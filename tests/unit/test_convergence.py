"""Stop rules over constructed training histories, and the history file round trip."""

from __future__ import annotations

from training.convergence import ConvergenceRules, HistoryRow, append_row, decide, read_history
from training.report import write_report


def row(v: int, m: float, promoted: bool = True, train: float | None = None, n: int = 0) -> HistoryRow:
    return HistoryRow(f"v{v:03d}", promoted, n or 20 * v, m, m / 2, train, "2026-11-22T00:00:00")


RULES = ConvergenceRules(
    target_map50=0.9, plateau_window=2, plateau_min_gain=0.01, max_overfit_gap=0.3, max_versions=10
)


def test_keeps_training_while_improving():
    d = decide([row(1, 0.3), row(2, 0.5), row(3, 0.6)], RULES)
    assert d.keep_training and "0.600" in d.reason


def test_target_reached_stops():
    d = decide([row(1, 0.5), row(2, 0.91)], RULES)
    assert not d.keep_training and d.reason.startswith("target reached")


def test_a_rejected_candidate_does_not_count_for_the_target():
    assert decide([row(1, 0.5), row(2, 0.95, promoted=False)], RULES).keep_training


def test_plateau_stops():
    # before the last 2: best 0.60; last 2: best 0.605 -> gain 0.005 < 0.01
    d = decide([row(1, 0.4), row(2, 0.6), row(3, 0.605), row(4, 0.59)], RULES)
    assert not d.keep_training and d.reason.startswith("plateau") and "+0.005" in d.reason
    # gain 0.02 >= 0.01 keeps going
    assert decide([row(1, 0.4), row(2, 0.6), row(3, 0.62), row(4, 0.59)], RULES).keep_training


def test_overfitting_stops():
    d = decide([row(1, 0.4, train=0.5), row(2, 0.45, train=0.8)], RULES)  # gap 0.35 > 0.3
    assert not d.keep_training and d.reason.startswith("overfitting") and "0.350" in d.reason


def test_a_handful_of_held_out_tasks_stops_nothing():
    rules = ConvergenceRules(target_map50=0.9, plateau_window=1, max_overfit_gap=0.3, min_holdout_tasks=20)

    def small(v: int, m: float, n_holdout: int, train: float | None = None) -> HistoryRow:
        return HistoryRow(f"v{v}", True, 20 * v, m, m / 2, train, "t", holdout_tasks=n_holdout)

    # 0.995 on 4 held-out tasks, then a plateau and an overfitting gap on 8: nothing to judge yet.
    d = decide([small(1, 0.995, 4), small(2, 0.5, 8, train=0.99)], rules)
    assert d.keep_training and "too few held-out tasks" in d.reason
    # The same score on 20 tasks reaches the target.
    d = decide([small(1, 0.995, 4), small(2, 0.95, 20)], rules)
    assert not d.keep_training and "0.950" in d.reason
    # Rows without the count (older histories) are judged as before.
    assert not decide([row(1, 0.95)], rules).keep_training


def test_version_budget():
    rules = ConvergenceRules(target_map50=None, plateau_window=50, max_overfit_gap=None, max_versions=3)
    d = decide([row(1, 0.1), row(2, 0.2), row(3, 0.3)], rules)
    assert not d.keep_training and d.reason.startswith("version budget")


def test_history_round_trip_and_report(tmp_path):
    path = tmp_path / "p" / "history.csv"
    rows = [row(1, 0.3, train=0.4), row(2, 0.5, promoted=False), row(3, 0.6)]
    rows[2] = HistoryRow(**{**rows[2].__dict__, "holdout_tasks": 12})
    for r in rows:
        append_row(path, r)
    assert read_history(path) == rows
    png, md = write_report(rows, tmp_path / "out", "7")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert "| v002 | no | 40 | 0.500 |" in md.read_text()


# --- one history file: the columns the job needs, old files, quoting --------------------------------------


def full_row(version: str, **kw) -> HistoryRow:
    base = dict(
        version=version,
        promoted=False,
        labeled_tasks=30,
        heldout_map50=0.5,
        heldout_map50_95=0.3,
        train_map50=0.9,
        created_at="2026-11-22T10:00:00+00:00",
        parent="7/v001-x",
        metric="mAP50",
        candidate=0.5,
        current=0.55,
        data_fingerprint="abc123",
        prelabel_version="v001-x",
        prelabel_predicted=20,
        prelabel_accepted=12,
        prelabel_corrected=5,
        prelabel_rejected=3,
        prelabel_added=4,
        prelabel_acceptance=0.6,
        reason='mAP50 0.5000 vs 0.5500: -0.0500 < min_improvement 0.005; "quoted", with commas',
        model_card="/m/7/rejected/v002/metadata.json",
    )
    return HistoryRow(**{**base, **kw})


def test_every_column_round_trips(tmp_path):
    path = tmp_path / "7" / "history.csv"
    rows = [full_row("v002"), full_row("v003", train_map50=None, current=None, prelabel_predicted=None)]
    for r in rows:
        append_row(path, r)
    assert read_history(path) == rows
    assert path.read_text().splitlines()[0].split(",")[-2:] == ["reason", "model_card"]


def test_a_csv_with_the_old_columns_is_read_and_rewritten_on_append(tmp_path):
    path = tmp_path / "7" / "history.csv"
    path.parent.mkdir()
    path.write_text(
        "version,promoted,labeled_tasks,heldout_map50,heldout_map50_95,train_map50,created_at\n"
        "v001,True,20,0.4,0.2,,2026-11-21T10:00:00\n"
    )
    (old,) = read_history(path)
    assert (old.version, old.promoted, old.heldout_map50, old.train_map50, old.data_fingerprint) == (
        "v001",
        True,
        0.4,
        None,
        "",
    )
    append_row(path, full_row("v002"))
    lines = path.read_text().splitlines()
    assert lines[0].endswith(",reason,model_card") and len(lines) == 3  # one header, both rows under it
    assert [r.version for r in read_history(path)] == ["v001", "v002"]


def test_the_legacy_attempt_log_is_merged_then_migrated(tmp_path):
    import json

    from training.convergence import LEGACY_JSONL_NAME, last_row, migrate_legacy_history

    project = tmp_path / "7"
    project.mkdir()
    card = project / "v001-a" / "metadata.json"
    card.parent.mkdir()
    card.write_text(
        json.dumps(
            {
                "task_ids": {"train": [1, 2, 3], "holdout": [4]},
                "metrics": {"candidate": {"overall": {"mAP50": 0.61, "mAP50-95": 0.33}}},
            }
        )
    )
    legacy = [
        # a run outside the queue: only in the log, its scores come from its model card
        {
            "version": "v001-a",
            "promoted": True,
            "created_at": "2026-11-21T10:00:00+00:00",
            "parent": None,
            "metric": "mAP50",
            "candidate": 0.61,
            "current": None,
            "reasons": ["no current model: the first model is published"],
            "data_fingerprint": "fp1",
            "model_card": str(card),
        },
        # a queued run: in the log and (old columns) in the CSV
        {
            "version": "v002-b",
            "promoted": False,
            "created_at": "2026-11-22T10:00:00+00:00",
            "parent": {"project": "7", "version": "v001-a"},
            "metric": "mAP50",
            "candidate": 0.6,
            "current": 0.61,
            "reasons": ["worse", "much worse"],
            "data_fingerprint": "fp2",
            "model_card": "/nowhere/metadata.json",
        },
    ]
    (project / LEGACY_JSONL_NAME).write_text("".join(json.dumps(e) + "\n" for e in legacy) + "{half a line")
    (project / "history.csv").write_text(
        "version,promoted,labeled_tasks,heldout_map50,heldout_map50_95,train_map50,created_at\n"
        "v002-b,False,5,0.6,0.3,,2026-11-22T10:00:00+00:00\n"
    )
    expected = [
        HistoryRow(
            "v001-a",
            True,
            4,
            0.61,
            0.33,
            None,
            "2026-11-21T10:00:00+00:00",
            metric="mAP50",
            candidate=0.61,
            data_fingerprint="fp1",
            reason="no current model: the first model is published",
            model_card=str(card),
        ),
        HistoryRow(
            "v002-b",
            False,
            5,
            0.6,
            0.3,
            None,
            "2026-11-22T10:00:00+00:00",
            parent="7/v001-a",
            metric="mAP50",
            candidate=0.6,
            current=0.61,
            data_fingerprint="fp2",
            reason="worse; much worse",
            model_card="/nowhere/metadata.json",
        ),
    ]
    path = project / "history.csv"
    assert read_history(path) == expected  # readable before any migration
    assert last_row(path).data_fingerprint == "fp2"
    assert migrate_legacy_history(project)
    assert not (project / LEGACY_JSONL_NAME).exists() and (project / "history.jsonl.migrated").exists()
    assert read_history(path) == expected  # the same rows, now from the CSV alone
    assert not migrate_legacy_history(project)


def test_overfitting_fires_on_rows_read_back_from_the_file(tmp_path):
    path = tmp_path / "7" / "history.csv"
    append_row(path, full_row("v001", promoted=True, heldout_map50=0.45, train_map50=0.95))
    d = decide(read_history(path), RULES)  # gap 0.5 > 0.3
    assert not d.keep_training and d.reason.startswith("overfitting") and "0.500" in d.reason
    append_row(path, full_row("v002", promoted=True, heldout_map50=0.5, train_map50=None))
    assert decide(read_history(path), RULES).keep_training  # no training-split score: the rule cannot fire
