"""Read a project's labeled tasks and its labeling config from Label Studio, for one training run.

Why paging ``GET /api/tasks`` (``client.tasks.list``) rather than an export snapshot: a snapshot is one JSON
document of every task that has to be parsed whole, while pages of ``page_size`` tasks are reduced at once to
what training needs (task id, image URL, the regions of one annotation), so memory stays proportional to
the labeled tasks' regions, not to everything Label Studio stores about them (drafts, predictions, history).
Checked against Label Studio 1.23.2: the ``total_annotations > 0`` filter leaves out tasks that only have
cancelled (skipped) annotations, and ordering by id keeps pages stable while annotators keep working
(a task labeled during the export lands on a later page, or is seen twice, and is de-duplicated here).

Each labeled task also keeps the prediction its annotation started from, for :mod:`training.prelabel_review`.
Checked against Label Studio 1.23.2: ``GET /api/tasks`` lists an annotation's ``parent_prediction`` (the id of
the prediction the editor opened it from) and every prediction of the task, but not the annotation's
``prediction`` field (the snapshot Label Studio stores of the prediction of the project's ``model_version``;
only ``/api/projects/<id>/export`` shows it, and only when ``model_version`` names predictions, not when it
names the ML backend). See :func:`base_prediction` for the order in which they are used.

Failures to reach Label Studio raise :class:`LabelStudioUnavailable` with a message that says what to fix;
the training queue retries those with a backoff.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx
from label_studio_sdk.core.api_error import ApiError

from annoloop.labelstudio import LabelStudioAccess, LabelStudioNotConfigured

log = logging.getLogger(__name__)

#: Data Manager query: tasks with at least one non-cancelled annotation, oldest id first.
_LABELED_QUERY = json.dumps(
    {
        "filters": {
            "conjunction": "and",
            "items": [
                {
                    "filter": "filter:tasks:total_annotations",
                    "operator": "greater",
                    "type": "Number",
                    "value": 0,
                }
            ],
        },
        "ordering": ["tasks:id"],
    }
)


class LabelStudioUnavailable(RuntimeError):
    """Label Studio cannot be read right now (down, wrong URL, refused key): worth retrying later."""


class ProjectNotFound(LookupError):
    """The Label Studio project does not exist (or the key's user cannot see it): retrying will not help."""


@dataclass(frozen=True)
class BasePrediction:
    """The prediction an annotation started from (its pre-labels), as Label Studio stores it.

    ``source`` says how it was found: ``parent_prediction`` (the annotation names it), ``annotation`` (the
    annotation's own ``prediction`` snapshot, in exports), or ``project_model_version`` (the task's prediction
    of the project's ``model_version``, the one Label Studio shows and snapshots).
    """

    prediction_id: int | None
    model_version: str
    result: tuple[Mapping[str, Any], ...]
    score: float | None
    source: str


@dataclass(frozen=True)
class LabeledTask:
    """One task as training needs it: its data and the result of the annotation that counts."""

    task_id: int
    data: Mapping[str, Any]
    annotation_id: int
    updated_at: str
    result: tuple[Mapping[str, Any], ...]
    #: The pre-labels that annotation started from, if any.
    prediction: BasePrediction | None = None


@dataclass
class ProjectExport:
    """What one export read: the config, the labeled tasks, and what was left out and why."""

    project_id: int
    title: str
    label_config: str
    tasks: list[LabeledTask] = field(default_factory=list)
    #: Tasks seen but left out, by reason (tasks with only skips never reach us: the query filters them).
    skipped: dict[str, int] = field(default_factory=dict)
    #: Label Studio's own counts for the project (all tasks, tasks with annotations, skips), for the card.
    project_stats: dict[str, int | None] = field(default_factory=dict)
    #: The project's ``model_version`` setting (which predictions Label Studio shows; may name the backend).
    model_version: str = ""


def _as_dict(obj: Any) -> dict[str, Any]:
    """SDK objects are pydantic models that keep unknown fields; plain dicts pass through."""
    if isinstance(obj, Mapping):
        return dict(obj)
    if hasattr(obj, "model_dump"):
        return obj.model_dump()
    return obj.dict()


def latest_annotation(annotations: Iterable[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The annotation that counts for training: the most recently updated one that was not cancelled.

    Why the latest: a relabel (a reviewer's fix, a second pass) is newer than what it corrects. Cancelled
    annotations are skips, not "this image has nothing in it", so they never count.
    """
    best: Mapping[str, Any] | None = None
    best_key: tuple[str, int] = ("", -1)
    for ann in annotations:
        if ann.get("was_cancelled"):
            continue
        key = (str(ann.get("updated_at") or ann.get("created_at") or ""), int(ann.get("id") or 0))
        if best is None or key > best_key:
            best, best_key = ann, key
    return best


def _prediction(p: Mapping[str, Any], source: str) -> BasePrediction:
    score = p.get("score")
    pid = p.get("id")
    return BasePrediction(
        prediction_id=int(pid) if isinstance(pid, int | str) and str(pid).isdigit() else None,
        model_version=str(p.get("model_version") or ""),
        result=tuple(_as_dict(r) for r in p.get("result") or []),
        score=float(score) if isinstance(score, int | float) else None,
        source=source,
    )


def base_prediction(
    annotation: Mapping[str, Any],
    predictions: Iterable[Mapping[str, Any]],
    project_model_version: str = "",
) -> BasePrediction | None:
    """The prediction ``annotation`` started from, or None when it did not start from one.

    In order: the task's prediction named by ``parent_prediction`` (what the editor records when an annotator
    submits a pre-labeled task); else the annotation's own ``prediction`` snapshot when it has one (exports);
    else, as Label Studio snapshots it, the task's first prediction of the project's ``model_version``
    created before the annotation. An annotation that names a prediction that no longer exists started
    from nothing we can compare.
    """
    parent = annotation.get("parent_prediction")
    if isinstance(parent, Mapping):
        parent = parent.get("id")
    preds = [p for p in predictions if isinstance(p, Mapping)]
    if parent is not None:
        for p in preds:
            if str(p.get("id")) == str(parent):
                return _prediction(p, "parent_prediction")
        return None
    snapshot = annotation.get("prediction")
    if isinstance(snapshot, Mapping) and snapshot.get("model_version") and snapshot.get("result") is not None:
        return _prediction(snapshot, "annotation")
    if project_model_version:
        created = str(annotation.get("created_at") or "")
        same = [
            p
            for p in preds
            if p.get("model_version") == project_model_version
            and (not created or str(p.get("created_at") or "") <= created)
        ]
        if same:
            return _prediction(min(same, key=lambda p: int(p.get("id") or 0)), "project_model_version")
    return None


def _unavailable(access: LabelStudioAccess, error: Exception) -> LabelStudioUnavailable:
    if isinstance(error, ApiError):
        status = error.status_code
        if status in (401, 403):
            return LabelStudioUnavailable(
                f"Label Studio at {access.url} refused the API key (HTTP {status}): check LABEL_STUDIO_API_KEY "
                "(a legacy token needs Label Studio started with --enable-legacy-api-token)"
            )
        return LabelStudioUnavailable(f"Label Studio at {access.url} answered HTTP {status}")
    if isinstance(error, LabelStudioNotConfigured):
        return LabelStudioUnavailable(str(error))
    return LabelStudioUnavailable(
        f"Label Studio at {access.url or '(LABEL_STUDIO_URL not set)'} is unreachable: "
        f"{type(error).__name__}: {error}"
    )


def export_project(access: LabelStudioAccess, project_id: int, page_size: int = 100) -> ProjectExport:
    """Read the project's labeling config and every labeled task, keeping one annotation per task."""
    try:
        client = access.client
        project = client.projects.get(id=project_id)
    except ApiError as e:
        if e.status_code == 404:
            raise ProjectNotFound(
                f"Label Studio project {project_id} does not exist at {access.url} "
                "(or the API key's user cannot see it)"
            ) from None
        raise _unavailable(access, e) from e
    except (httpx.HTTPError, LabelStudioNotConfigured) as e:
        raise _unavailable(access, e) from e

    out = ProjectExport(
        project_id=project_id,
        title=str(project.title or ""),
        label_config=str(project.label_config or ""),
        project_stats={
            key: getattr(project, key, None)
            for key in ("task_number", "num_tasks_with_annotations", "skipped_annotations_number")
        },
        model_version=str(getattr(project, "model_version", None) or ""),
    )
    seen: set[int] = set()
    try:
        pager = client.tasks.list(project=project_id, fields="all", page_size=page_size, query=_LABELED_QUERY)
        for item in pager:
            task = _as_dict(item)
            task_id = int(task["id"])
            if task_id in seen:
                out.skipped["duplicate_in_export"] = out.skipped.get("duplicate_in_export", 0) + 1
                continue
            seen.add(task_id)
            ann = latest_annotation(_as_dict(a) for a in task.get("annotations") or [])
            if ann is None:  # only cancelled annotations: a skip, not a label
                out.skipped["only_cancelled"] = out.skipped.get("only_cancelled", 0) + 1
                continue
            out.tasks.append(
                LabeledTask(
                    task_id=task_id,
                    data=dict(task.get("data") or {}),
                    annotation_id=int(ann.get("id") or 0),
                    updated_at=str(ann.get("updated_at") or ann.get("created_at") or ""),
                    result=tuple(_as_dict(r) for r in ann.get("result") or []),
                    prediction=base_prediction(
                        ann, (_as_dict(p) for p in task.get("predictions") or []), out.model_version
                    ),
                )
            )
    except ApiError as e:
        raise _unavailable(access, e) from e
    except httpx.HTTPError as e:
        raise _unavailable(access, e) from e
    log.info(
        "project exported",
        extra={"project": project_id, "labeled_tasks": len(out.tasks), "skipped": out.skipped},
    )
    return out
