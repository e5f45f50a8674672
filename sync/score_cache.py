"""What the sync already knows per task, so a re-sync with no new task and no new model infers nothing.

A row is valid for one (task, image URL, model version): a new model or a changed image means scoring again.
SQLite (standard library) because the cache must survive restarts, be read in pages and be written by one
sync at a time (the sync's lock); embeddings are stored as float16 blobs (512 bytes for a 256-d vector).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

_SCHEMA = """
CREATE TABLE IF NOT EXISTS scores (
    task_id INTEGER PRIMARY KEY,
    image TEXT NOT NULL,
    model_version TEXT NOT NULL,
    uncertainty REAL,
    embedding BLOB NOT NULL,
    labels TEXT NOT NULL,
    result TEXT NOT NULL
)
"""


@dataclass
class Scored:
    """One task as scored by one model: what ranking and writing back need."""

    task_id: int
    image: str
    model_version: str
    uncertainty: float | None  # None in the cold start (no model)
    embedding: np.ndarray
    labels: dict[str, int] = field(default_factory=dict)  # pre-label regions per label
    result: list[dict[str, Any]] = field(default_factory=list)  # the pre-label regions themselves


class ScoreCache:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(path)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> ScoreCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def lookup(self, keys: Sequence[tuple[int, str]], model_version: str) -> dict[int, Scored]:
        """Rows of ``(task_id, image)`` scored by ``model_version`` on that same image."""
        wanted = dict(keys)
        found: dict[int, Scored] = {}
        ids = list(wanted)
        for start in range(0, len(ids), 500):  # SQLite's bound-parameter limit
            chunk = ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            rows = self._db.execute(
                f"SELECT task_id, image, model_version, uncertainty, embedding, labels, result FROM scores "
                f"WHERE model_version = ? AND task_id IN ({marks})",
                [model_version, *chunk],
            )
            for tid, image, version, u, emb, labels, result in rows:
                if wanted.get(tid) == image:
                    found[tid] = Scored(
                        tid,
                        image,
                        version,
                        u,
                        np.frombuffer(emb, dtype=np.float16).astype(np.float32),
                        json.loads(labels),
                        json.loads(result),
                    )
        return found

    def store(self, rows: Iterable[Scored]) -> None:
        self._db.executemany(
            "INSERT OR REPLACE INTO scores VALUES (?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    r.task_id,
                    r.image,
                    r.model_version,
                    r.uncertainty,
                    np.asarray(r.embedding, dtype=np.float16).tobytes(),
                    json.dumps(r.labels),
                    json.dumps(r.result),
                )
                for r in rows
            ],
        )
        self._db.commit()

    def forget_except(self, task_ids: set[int]) -> int:
        """Drop rows of tasks that no longer exist in the project; returns how many."""
        known = [row[0] for row in self._db.execute("SELECT task_id FROM scores")]
        gone = [(t,) for t in known if t not in task_ids]
        self._db.executemany("DELETE FROM scores WHERE task_id = ?", gone)
        self._db.commit()
        return len(gone)
