"""Admin views of the model store: list a project's versions with their metrics, roll back to one."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from annoloop.model_store import ModelStore, ModelStoreError


@dataclass(frozen=True)
class VersionRow:
    version: str
    current: bool
    parent: str | None
    created: str | None
    metrics: dict[str, float]


def _metric(meta: dict[str, Any], name: str) -> float | None:
    """Model cards keep the candidate's held-out metrics under metrics.candidate (training) or metrics."""
    m = meta.get("metrics") or {}
    value = (m.get("candidate") or {}).get(name, m.get(name)) if isinstance(m, dict) else None
    return float(value) if isinstance(value, int | float) else None


def list_versions(store: ModelStore, project: str) -> list[VersionRow]:
    current = store.current(project)
    rows = []
    for mv in store.versions(project):
        meta = mv.metadata()
        metrics = {
            k: v
            for k in ("mAP50", "mAP50-95", "precision", "recall", "f1")
            if (v := _metric(meta, k)) is not None
        }
        rows.append(
            VersionRow(
                mv.version,
                current is not None and current.version == mv.version,
                meta.get("parent_version"),
                meta.get("created_at"),
                metrics,
            )
        )
    return rows


def format_versions(rows: list[VersionRow]) -> str:
    if not rows:
        return "no versions"
    names = ["mAP50", "mAP50-95", "precision", "recall", "f1"]
    lines = [f"{'':1} {'version':<28} {'parent':<28} " + " ".join(f"{n:>9}" for n in names)]
    for r in rows:
        vals = " ".join(f"{r.metrics[n]:>9.3f}" if n in r.metrics else f"{'-':>9}" for n in names)
        lines.append(f"{'*' if r.current else ' '} {r.version:<28} {r.parent or '-':<28} {vals}")
    return "\n".join(lines)


def rollback(store: ModelStore, project: str, to: str) -> str:
    """Point the project back at an existing version; every backend process follows within a second."""
    known = [mv.version for mv in store.versions(project)]
    if to not in known:
        raise ModelStoreError(
            f"project {project} has no version {to!r} (versions: {', '.join(known) or 'none'})"
        )
    previous = store.current(project)
    store.set_current(project, to)
    return previous.version if previous else "none"
