"""Everything the sync reads from and writes to Label Studio, through label-studio-sdk.

Reads page through ``GET /api/tasks`` with a Data Manager filter (unlabeled = no non-cancelled annotation, so
a task somebody skipped stays in the queue for the others), so memory holds one page of task JSON. Writes
follow the order that keeps the queue usable at every moment (see :meth:`QueueWriter`): predictions of a new
version are imported in full before the project points at it, and old versions are deleted only after.
API calls therefore grow with pages and chunks, never with tasks.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import httpx
from label_studio_sdk.core.api_error import ApiError

from annoloop.labelstudio import LabelStudioAccess, LabelStudioNotConfigured

log = logging.getLogger(__name__)

UNCERTAINTY_SAMPLING = "Uncertainty sampling"


class SyncError(RuntimeError):
    """The sync cannot run (Label Studio unreachable, key refused, no such project): one line for the admin."""


def _query(labeled: bool) -> str:
    return json.dumps(
        {
            "filters": {
                "conjunction": "and",
                "items": [
                    {
                        "filter": "filter:tasks:total_annotations",
                        "operator": "greater" if labeled else "equal",
                        "type": "Number",
                        "value": 0,
                    }
                ],
            },
            "ordering": ["tasks:id"],
        }
    )


def explain(access: LabelStudioAccess, error: Exception, what: str) -> SyncError:
    """Turn a failed call into one line that says what to fix."""
    if isinstance(error, SyncError):
        return error
    if isinstance(error, LabelStudioNotConfigured):
        return SyncError(str(error))
    if isinstance(error, ApiError):
        if error.status_code in (401, 403):
            return SyncError(
                f"Label Studio at {access.url} refused the API key (HTTP {error.status_code}) while {what}: check "
                "LABEL_STUDIO_API_KEY (a legacy token needs Label Studio started with --enable-legacy-api-token)"
            )
        detail = error.body if isinstance(error.body, str) else json.dumps(error.body)[:300]
        return SyncError(
            f"Label Studio at {access.url} answered HTTP {error.status_code} while {what}: {detail}"
        )
    if isinstance(error, httpx.HTTPError):
        return SyncError(
            f"Label Studio at {access.url} is unreachable while {what}: {type(error).__name__}: {error}"
        )
    return SyncError(f"{what} failed: {type(error).__name__}: {error}")


def _plain(obj: Any) -> dict[str, Any]:
    if isinstance(obj, dict):
        return obj
    return obj.model_dump() if hasattr(obj, "model_dump") else dict(obj)


class ProjectIO:
    """One Label Studio project as the sync sees it."""

    def __init__(self, access: LabelStudioAccess, project_id: int):
        self.access = access
        self.project_id = project_id

    def project(self) -> dict[str, Any]:
        try:
            return _plain(self.access.client.projects.get(id=self.project_id))
        except ApiError as e:
            if e.status_code == 404:
                raise SyncError(
                    f"Label Studio project {self.project_id} does not exist at {self.access.url} "
                    "(or the API key's user cannot see it)"
                ) from None
            raise explain(self.access, e, f"reading project {self.project_id}") from None
        except (httpx.HTTPError, LabelStudioNotConfigured) as e:
            raise explain(self.access, e, f"reading project {self.project_id}") from None

    def tasks(self, labeled: bool, page_size: int) -> Iterator[dict[str, Any]]:
        """Unlabeled (or labeled) tasks, oldest id first; labeled ones with their annotations."""
        what = f"reading the {'labeled' if labeled else 'unlabeled'} tasks of project {self.project_id}"
        try:
            pager = self.access.client.tasks.list(
                project=self.project_id,
                fields="all" if labeled else "task_only",
                page_size=page_size,
                query=_query(labeled),
            )
            seen: set[int] = set()
            for item in pager:
                task = _plain(item)
                if task["id"] not in seen:  # a task labeled meanwhile may show up on two pages
                    seen.add(task["id"])
                    yield task
        except (ApiError, httpx.HTTPError, LabelStudioNotConfigured) as e:
            raise explain(self.access, e, what) from None

    def model_versions(self) -> dict[str, int]:
        """Prediction model versions in the project with their prediction counts."""
        try:
            body = self.access.request("GET", f"api/projects/{self.project_id}/model-versions/").json()
        except (ApiError, httpx.HTTPError) as e:
            raise explain(self.access, e, "listing model versions") from None
        return {str(k): int(v) for k, v in body.items()} if isinstance(body, dict) else {}

    # --- writing ----------------------------------------------------------------------------------------

    def import_predictions(self, predictions: Sequence[dict[str, Any]], chunk: int) -> int:
        created = 0
        for start in range(0, len(predictions), chunk):
            part = predictions[start : start + chunk]
            try:
                resp = self.access.request(
                    "POST", f"api/projects/{self.project_id}/import/predictions", json=list(part)
                )
            except (ApiError, httpx.HTTPError) as e:
                raise explain(self.access, e, f"importing predictions {start}-{start + len(part)}") from None
            created += int(resp.json().get("created", 0))
        return created

    def point_queue_at(self, model_version: str) -> None:
        """Uncertainty sampling over ``model_version``'s predictions (set after they exist: LS checks)."""
        try:
            self.access.request(
                "PATCH",
                f"api/projects/{self.project_id}",
                json={
                    "sampling": UNCERTAINTY_SAMPLING,
                    "show_collab_predictions": True,
                    "model_version": model_version,
                },
            )
        except (ApiError, httpx.HTTPError) as e:
            raise explain(self.access, e, "setting the project's sampling and model version") from None

    def delete_version(self, model_version: str) -> int:
        try:
            resp = self.access.request(
                "DELETE",
                f"api/projects/{self.project_id}/model-versions/",
                json={"model_version": model_version},
            )
        except (ApiError, httpx.HTTPError) as e:
            raise explain(self.access, e, f"deleting predictions of {model_version}") from None
        try:
            return int(resp.json().get("deleted", 0))
        except ValueError:
            return 0

    def ensure_view(self, title: str) -> int:
        """The Data Manager tab sorted by the ranking (score ascending = label first), created once."""
        data = {
            "title": title,
            "ordering": ["tasks:predictions_score"],
            "filters": {
                "conjunction": "and",
                "items": [
                    {
                        "filter": "filter:tasks:total_annotations",
                        "operator": "equal",
                        "type": "Number",
                        "value": 0,
                    }
                ],
            },
            "hiddenColumns": {"explore": ["tasks:annotations_results"], "labeling": []},
        }
        try:
            views = [_plain(v) for v in self.access.client.views.list(project=self.project_id)]
            mine = [v for v in views if (v.get("data") or {}).get("title") == title]
            if mine:
                view_id = int(mine[0]["id"])
                if (mine[0].get("data") or {}).get("ordering") != data["ordering"]:
                    self.access.request(
                        "PATCH", f"api/dm/views/{view_id}", json={"project": self.project_id, "data": data}
                    )
                return view_id
            resp = self.access.request(
                "POST", "api/dm/views", json={"project": self.project_id, "data": data}
            )
            return int(resp.json()["id"])
        except (ApiError, httpx.HTTPError) as e:
            raise explain(self.access, e, f"creating the Data Manager view {title!r}") from None
