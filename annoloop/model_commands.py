"""Admin views of the model store: list a project's versions with their metrics, roll back to one."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from annoloop.model_store import ModelStore, ModelStoreError, ModelVersion


@dataclass(frozen=True)
class VersionRow:
    version: str
    current: bool
    parent: str | None
    created: str | None
    metrics: dict[str, float]
    #: What annotators did to this version's pre-labels while it was served (``training.prelabel_review``:
    #: predicted, accepted, corrected, rejected, added, rates), as the latest later training measured it.
    prelabel: dict[str, Any] = field(default_factory=dict)


def _metric(meta: dict[str, Any], name: str) -> float | None:
    """A version's held-out metric from its model card: metrics.candidate.overall (training jobs)."""
    cand = (meta.get("metrics") or {}).get("candidate") or {}
    value = (cand.get("overall") or cand).get(name)
    return float(value) if isinstance(value, int | float) else None


def _parent(meta: dict[str, Any]) -> str | None:
    parent = meta.get("parent")
    return parent.get("version") if isinstance(parent, dict) else None


def prelabel_reviews(cards: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Version -> its pre-label review, from the ``prelabel_review`` of the model cards of later trainings.

    Why the latest card wins: each training counts every annotation made from a version's pre-labels so far,
    so a later card holds the same annotations and the ones made since.
    """
    out: dict[str, dict[str, Any]] = {}
    for meta in sorted(cards, key=lambda m: str(m.get("created_at") or "")):
        versions = (meta.get("prelabel_review") or {}).get("versions") or {}
        out.update({str(v): stats for v, stats in versions.items() if isinstance(stats, dict)})
    return out


def list_versions(store: ModelStore, project: str) -> list[VersionRow]:
    current = store.current(project)
    published: list[tuple[ModelVersion, dict[str, Any]]] = [
        (mv, mv.metadata()) for mv in store.versions(project)
    ]
    reviews = prelabel_reviews([m for _, m in published] + [mv.metadata() for mv in store.rejected(project)])
    rows = []
    for mv, meta in published:
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
                reviews.get(mv.version, {}),
            )
        )
    return rows


def format_versions(rows: list[VersionRow]) -> str:
    """The table ``annoloop models`` prints. ``reviewed``: this version's pre-labels annotators have reviewed
    since it was served; ``kept``: the share they accepted (same label, IoU >= 0.9)."""
    if not rows:
        return "no versions"
    names = ["mAP50", "mAP50-95", "precision", "recall", "f1"]
    lines = [
        f"{'':1} {'version':<28} {'parent':<28} "
        + " ".join(f"{n:>9}" for n in names)
        + f" {'reviewed':>9} {'kept':>6}"
    ]
    for r in rows:
        vals = " ".join(f"{r.metrics[n]:>9.3f}" if n in r.metrics else f"{'-':>9}" for n in names)
        reviewed = r.prelabel.get("predicted")
        rate = r.prelabel.get("acceptance_rate")
        review = f" {reviewed if reviewed is not None else '-':>9} " + (
            f"{rate:>6.0%}" if isinstance(rate, int | float) else f"{'-':>6}"
        )
        lines.append(f"{'*' if r.current else ' '} {r.version:<28} {r.parent or '-':<28} {vals}{review}")
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
