"""Admin set-up of a Label Studio project: import a labeled dataset's images, connect the ML backend.

Importing keeps the dataset's boxes *aside* by default (a JSON file of task id -> Label Studio result), because
the point of annoloop is that people label: the boxes serve to simulate an annotator (the demo) or to measure.
``as_annotations`` imports them as annotations instead (e.g. to start from an existing labeled set).
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

import httpx
from label_studio_sdk.core.api_error import ApiError

from annoloop.datasets import DetectionDataset, LabeledImage, rectangle_config, to_result
from annoloop.labelstudio import LabelStudioAccess
from ml_backend.label_config import LabelConfigError, parse_label_config

log = logging.getLogger(__name__)

Storage = Literal["upload", "local-files"]
GROUND_TRUTH_NAME = "ground_truth.json"


class SetupError(RuntimeError):
    """The import or connection cannot be done as asked; one line says why."""


def _call(access: LabelStudioAccess, method: str, path: str, what: str, **kwargs: Any) -> httpx.Response:
    from sync.labelstudio_io import explain

    try:
        return access.request(method, path, **kwargs)
    except (ApiError, httpx.HTTPError) as e:
        raise SetupError(str(explain(access, e, what))) from None


@dataclass
class ImportReport:
    project: int
    created_project: bool
    tasks: int
    boxes: int
    storage: Storage
    as_annotations: bool
    ground_truth: Path | None
    dropped_boxes: int
    splits: dict[str, int] = field(default_factory=dict)

    def lines(self) -> list[str]:
        out = [
            f"project {self.project}{' (created)' if self.created_project else ''}: imported {self.tasks} tasks "
            f"({self.storage}), {self.boxes} boxes "
            + ("as annotations" if self.as_annotations else f"kept aside in {self.ground_truth}")
        ]
        if self.splits:
            out.append("  dataset splits: " + ", ".join(f"{k} {v}" for k, v in sorted(self.splits.items())))
        if self.dropped_boxes:
            out.append(f"  {self.dropped_boxes} boxes dropped (no area inside the image, or malformed)")
        return out


def ensure_project(
    access: LabelStudioAccess, dataset: DetectionDataset, project: int | None, title: str | None
) -> tuple[int, str, bool]:
    """The target project and its image field: an existing one whose config has every label, or a new one."""
    if project is None:
        if not title:
            raise SetupError(
                "name an existing project (--project ID) or a title for a new one (--create TITLE)"
            )
        body = {"title": title, "label_config": rectangle_config(dataset.labels)}
        created = _call(access, "POST", "api/projects", "creating the project", json=body).json()
        return int(created["id"]), "image", True
    info = _call(access, "GET", f"api/projects/{project}", f"reading project {project}").json()
    try:
        controls = [
            c for c in parse_label_config(info.get("label_config") or "") if c.tag == "RectangleLabels"
        ]
    except LabelConfigError as e:
        raise SetupError(f"project {project}: {e}") from None
    if not controls:
        raise SetupError(f"project {project} has no RectangleLabels control for the boxes")
    missing = sorted(set(dataset.labels) - set(controls[0].labels))
    if missing:
        raise SetupError(
            f"project {project}'s labeling config lacks the dataset's labels {', '.join(missing)} "
            f"(it has {', '.join(controls[0].labels)})"
        )
    return project, controls[0].data_key, False


def _local_url(path: Path, document_root: Path) -> str:
    try:
        rel = path.resolve().relative_to(document_root.resolve())
    except ValueError:
        raise SetupError(
            f"{path} is not under the local-files document root {document_root} "
            "(LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT of the Label Studio server)"
        ) from None
    return f"/data/local-files/?d={quote(rel.as_posix())}"


def _upload(
    access: LabelStudioAccess,
    project: int,
    images: list[LabeledImage],
    data_key: str,
    progress: Callable[[int, int], None],
) -> dict[int, int]:
    """Upload image files (Label Studio stores copies); returns image index -> task id.

    Files go up in batches; Label Studio names each upload ``<8 hex>-<file name>``, which maps tasks back to
    files. A batch never holds two files of the same name.
    """
    mapping: dict[int, int] = {}
    batch: list[int] = []

    def flush() -> None:
        files = [(images[i].path.name, (images[i].path.name, images[i].path.read_bytes())) for i in batch]
        answer = _call(
            access,
            "POST",
            f"api/projects/{project}/import",
            "uploading images",
            params={"return_task_ids": "true"},
            files=files,
        ).json()
        ids = [int(t) for t in answer.get("task_ids", [])]
        by_name: dict[str, int] = {}
        for tid in ids:
            task = _call(access, "GET", f"api/tasks/{tid}", "reading an uploaded task").json()
            url = str(
                (task.get("data") or {}).get(data_key) or next(iter((task.get("data") or {}).values()), "")
            )
            by_name[url.rsplit("/", 1)[-1].split("-", 1)[-1]] = tid
        for i in batch:
            if images[i].path.name not in by_name:
                raise SetupError(f"Label Studio did not create a task for {images[i].path}")
            mapping[i] = by_name[images[i].path.name]
        progress(len(mapping), len(images))
        batch.clear()

    for i, im in enumerate(images):
        if len(batch) == 20 or any(images[j].path.name == im.path.name for j in batch):
            flush()
        batch.append(i)
    if batch:
        flush()
    return mapping


def import_dataset(
    access: LabelStudioAccess,
    dataset: DetectionDataset,
    *,
    project: int | None,
    create_title: str | None = None,
    storage: Storage = "upload",
    document_root: Path | None = None,
    as_annotations: bool = False,
    ground_truth_dir: Path | None = None,
    splits: set[str] | None = None,
    progress: Callable[[int, int], None] = lambda done, total: None,
    ground_truth_root: Path | None = None,
) -> ImportReport:
    """Create one task per image (of ``splits`` when given) in ``project`` (or a new project).

    The boxes go to ``ground_truth_dir`` (default ``<ground_truth_root>/<project>/import/``) as
    ``ground_truth.json`` = {task id: {"result", "split", "file"}}, unless ``as_annotations``.
    """
    images = [im for im in dataset.images if splits is None or im.split in splits]
    if not images:
        raise SetupError(f"no image of {dataset.root} is in the splits {sorted(splits or [])}")
    project_id, data_key, created = ensure_project(access, dataset, project, create_title)
    if storage == "local-files":
        if document_root is None:
            raise SetupError("--storage local-files needs the server's document root (--document-root)")
        folder = Path(*_common_parts([im.path.resolve().parent for im in images]))
        _local_url(folder, document_root)  # checks it is inside
        _call(
            access,
            "POST",
            "api/storages/localfiles",
            "registering the local-files storage",
            json={
                "project": project_id,
                "path": str(folder),
                "title": f"annoloop import {dataset.root.name}",
                "use_blob_urls": True,
            },
        )
        mapping: dict[int, int] = {}
        for start in range(0, len(images), 500):
            part = list(range(start, min(start + 500, len(images))))
            tasks = []
            for i in part:
                task: dict[str, Any] = {"data": {data_key: _local_url(images[i].path, document_root)}}
                if as_annotations:
                    task["annotations"] = [{"result": to_result(images[i], "label", data_key)}]
                tasks.append(task)
            answer = _call(
                access,
                "POST",
                f"api/projects/{project_id}/import",
                "importing tasks",
                params={"return_task_ids": "true"},
                json=tasks,
            ).json()
            ids = [int(t) for t in answer.get("task_ids", [])]
            if len(ids) != len(part):
                raise SetupError(f"Label Studio created {len(ids)} tasks for {len(part)} images")
            mapping.update(zip(part, ids, strict=True))
            progress(len(mapping), len(images))
    else:
        mapping = _upload(access, project_id, images, data_key, progress)
        if as_annotations:
            for i, tid in mapping.items():
                _call(
                    access,
                    "POST",
                    f"api/tasks/{tid}/annotations",
                    "creating annotations",
                    json={"result": to_result(images[i], "label", data_key)},
                )
    gt_path = None
    if not as_annotations:
        gt_dir = ground_truth_dir or (ground_truth_root or Path("models")) / str(project_id) / "import"
        gt_dir.mkdir(parents=True, exist_ok=True)
        gt_path = gt_dir / GROUND_TRUTH_NAME
        previous = json.loads(gt_path.read_text()) if gt_path.is_file() else {}
        previous.update(
            {
                str(tid): {
                    "result": to_result(images[i], "label", data_key),
                    "split": images[i].split,
                    "file": str(images[i].path),
                }
                for i, tid in mapping.items()
            }
        )
        gt_path.write_text(json.dumps(previous))
    split_counts: dict[str, int] = {}
    for im in images:
        split_counts[im.split or "-"] = split_counts.get(im.split or "-", 0) + 1
    return ImportReport(
        project_id,
        created,
        len(mapping),
        sum(len(im.boxes) for im in images),
        storage,
        as_annotations,
        gt_path,
        dataset.dropped_boxes,
        split_counts,
    )


def _common_parts(paths: list[Path]) -> tuple[str, ...]:
    parts = paths[0].parts
    for p in paths[1:]:
        n = 0
        while n < min(len(parts), len(p.parts)) and parts[n] == p.parts[n]:
            n += 1
        parts = parts[:n]
    return parts


@dataclass
class ConnectReport:
    project: int
    backend_id: int
    created: bool
    webhook_auth: bool

    def lines(self) -> list[str]:
        return [
            f"project {self.project}: ML backend {self.backend_id} "
            f"{'connected' if self.created else 'updated'}; uncertainty sampling on"
            + ("; webhook sends basic auth" if self.webhook_auth else "")
        ]


def connect_backend(
    access: LabelStudioAccess,
    project: int,
    url: str,
    title: str = "annoloop",
    basic_auth: tuple[str, str] | None = None,
) -> ConnectReport:
    """Connect (or update) the ML backend at ``url`` and set the project up for the ordered queue.

    Label Studio calls the backend's /health and /setup while handling this, so the backend must be up.
    Its webhook carries no basic auth by itself (checked on 1.23.2): the header is added to the webhook.
    """
    url = url.rstrip("/")
    body: dict[str, Any] = {"project": project, "url": url, "title": title, "auth_method": "NONE"}
    if basic_auth:
        body.update(auth_method="BASIC_AUTH", basic_auth_user=basic_auth[0], basic_auth_pass=basic_auth[1])
    existing = [
        b
        for b in _call(access, "GET", "api/ml", "listing ML backends", params={"project": project}).json()
        if str(b.get("url", "")).rstrip("/") == url
    ]
    if existing:
        backend_id = int(existing[0]["id"])
        _call(access, "PATCH", f"api/ml/{backend_id}", "updating the ML backend", json=body, timeout=120)
    else:
        backend_id = int(
            _call(
                access, "POST", "api/ml", f"connecting the ML backend at {url}", json=body, timeout=120
            ).json()["id"]
        )
    webhook_auth = False
    if basic_auth:
        token = base64.b64encode(f"{basic_auth[0]}:{basic_auth[1]}".encode()).decode()
        hooks = _call(access, "GET", "api/webhooks/", "listing webhooks", params={"project": project}).json()
        for hook in hooks:
            if str(hook.get("url", "")).startswith(url):
                _call(
                    access,
                    "PATCH",
                    f"api/webhooks/{hook['id']}/",
                    "adding basic auth to the webhook",
                    json={"headers": {"Authorization": f"Basic {token}"}},
                )
                webhook_auth = True
    _call(
        access,
        "PATCH",
        f"api/projects/{project}",
        "setting uncertainty sampling",
        json={"sampling": "Uncertainty sampling", "show_collab_predictions": True},
    )
    return ConnectReport(project, backend_id, not existing, webhook_auth)
