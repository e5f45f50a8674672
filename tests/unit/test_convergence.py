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


def test_version_budget():
    rules = ConvergenceRules(target_map50=None, plateau_window=50, max_overfit_gap=None, max_versions=3)
    d = decide([row(1, 0.1), row(2, 0.2), row(3, 0.3)], rules)
    assert not d.keep_training and d.reason.startswith("version budget")


def test_history_round_trip_and_report(tmp_path):
    path = tmp_path / "p" / "history.csv"
    rows = [row(1, 0.3, train=0.4), row(2, 0.5, promoted=False), row(3, 0.6)]
    for r in rows:
        append_row(path, r)
    assert read_history(path) == rows
    png, md = write_report(rows, tmp_path / "out", "7")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert "| v002 | no | 40 | 0.500 |" in md.read_text()
