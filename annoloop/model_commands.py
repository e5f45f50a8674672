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
    """A version's held-out metric from its model card: metrics.candidate.overall (training jobs)."""
    cand = (meta.get("metrics") or {}).get("candidate") or {}
    value = (cand.get("overall") or cand).get(name)
    return float(value) if isinstance(value, int | float) else None


def _parent(meta: dict[str, Any]) -> str | None:
    parent = meta.get("parent")
    return parent.get("version") if isinstance(parent, dict) else None


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
                _parent(meta),
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
