"""Smoke test for the real-Label-Studio test harness (``annoloop/labelstudio_server.py``).

Why: every integration test of the ML backend builds on this harness; if starting the server,
authenticating with the generated token, creating a project or importing local-file tasks
breaks (for example after a Label Studio upgrade), this test says so first and plainly.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import requests
from PIL import Image

from annoloop.labelstudio_server import (
    RECTANGLE_LABEL_CONFIG,
    LabelStudioServer,
)

ROOT = Path(__file__).resolve().parents[1]
LS_VENV = ROOT / ".ls-venv"

pytestmark = pytest.mark.labelstudio


def _write_png(path: Path, color: tuple[int, int, int], size: tuple[int, int]) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format="PNG")
    return path.read_bytes()


def test_project_with_local_file_tasks(label_studio: LabelStudioServer) -> None:
    """Create a RectangleLabels project, import two local-file image tasks, read them back."""
    ls = label_studio
    images = {
        "smoke/red.png": _write_png(ls.files_root / "smoke" / "red.png", (255, 0, 0), (64, 48)),
        "smoke/green.png": _write_png(ls.files_root / "smoke" / "green.png", (0, 255, 0), (32, 32)),
    }
    project = ls.create_project("annoloop smoke", RECTANGLE_LABEL_CONFIG)
    ls.add_local_storage(project, "smoke")
    urls = [ls.local_file_url(rel) for rel in images]
    assert urls == ["/data/local-files/?d=smoke/red.png", "/data/local-files/?d=smoke/green.png"]

    task_ids = ls.import_tasks(project, [{"data": {"image": url}} for url in urls])

    assert len(task_ids) == 2
    assert task_ids == sorted(task_ids)
    tasks = {task["id"]: task for task in ls.tasks(project)}
    assert sorted(tasks) == task_ids
    assert [tasks[task_id]["data"] for task_id in task_ids] == [{"image": url} for url in urls]
    assert all(ls.predictions(task_id) == [] for task_id in task_ids)

    # The URLs resolve against the server with the API token (this is what the backend does).
    for url, raw in zip(urls, images.values(), strict=True):
        response = requests.get(f"{ls.url}{url}", headers={"Authorization": f"Token {ls.token}"}, timeout=10)
        assert response.status_code == 200, url
        assert response.content == raw
        assert requests.get(f"{ls.url}{url}", timeout=10).status_code == 401
