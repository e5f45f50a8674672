"""The admin commands as users run them: `annoloop models`, `rollback`, `status`, `report`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from annoloop.model_store import ModelStore
from training.convergence import HistoryRow, append_row, history_path

EXE = str(Path(sys.executable).parent / "annoloop")


def run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [EXE, *args], env={**os.environ, **env}, capture_output=True, text=True, timeout=120
    )


def test_models_rollback_status_report(tmp_path, redis_url):
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"weights")
    store = ModelStore(tmp_path / "models")
    store.publish("3", "v001", weights, {"metrics": {"candidate": {"overall": {"mAP50": 0.41}}}})
    store.publish(
        "3",
        "v002",
        weights,
        {
            "parent": {"project": "3", "version": "v001"},
            "metrics": {"candidate": {"overall": {"mAP50": 0.57}}},
        },
    )
    for i, m in enumerate((0.41, 0.57), 1):
        append_row(history_path(store.root, "3"), HistoryRow(f"v00{i}", True, 20 * i, m, m / 2, m + 0.1, "t"))
    env = {"MODEL_DIR": str(store.root), "REDIS_URL": redis_url}

    out = run("models", "--project", "3", env=env)
    assert out.returncode == 0, out.stderr
    assert "* v002" in out.stdout and "0.570" in out.stdout and "  v001" in out.stdout

    out = run("rollback", "--project", "3", "--to", "v001", env=env)
    assert out.returncode == 0 and "now serving v001 (was v002)" in out.stdout
    assert store.current("3").version == "v001"
    out = run("rollback", "--project", "3", "--to", "v404", env=env)
    assert out.returncode == 1 and "no version 'v404'" in out.stderr
    assert store.current("3").version == "v001"

    out = run("status", "--project", "3", env=env)
    assert out.returncode == 0, out.stderr
    assert "served model:  v001 (3)" in out.stdout and "trainings:     2 (2 promoted)" in out.stdout
    assert "queue:         idle" in out.stdout

    out = run("report", "--project", "3", "--out", str(tmp_path / "rep"), env=env)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "rep" / "learning-curve-3.png").stat().st_size > 5000
    assert "| v002 | yes | 40 | 0.570 |" in out.stdout

    out = run("models", "--project", "abc", env=env)
    assert out.returncode == 2 and "project id is a number" in out.stderr
