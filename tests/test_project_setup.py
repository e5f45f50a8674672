"""`annoloop import` and `annoloop connect` against a real Label Studio 1.23.2."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import SHARED, VENV_BIN, publish, start_backend

pytestmark = pytest.mark.labelstudio

BCCD = SHARED / "datasets" / "bccd"


def _annoloop(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(VENV_BIN / "annoloop"), *args],
        env={**os.environ, "LOG_LEVEL": "ERROR", **env},
        capture_output=True,
        text=True,
        timeout=600,
    )


def _env(ls, model_dir: Path) -> dict[str, str]:
    return {"LABEL_STUDIO_URL": ls.url, "LABEL_STUDIO_API_KEY": ls.token, "MODEL_DIR": str(model_dir)}


def test_import_bccd_test_split_by_upload_keeps_boxes_aside(label_studio, tmp_path):
    ls = label_studio
    assert BCCD.is_dir(), f"BCCD not found at {BCCD} (set ANNOLOOP_SHARED_DIR to the shared folder)"
    done = _annoloop(
        "import",
        str(BCCD),
        "--format",
        "voc",
        "--create",
        "BCCD import",
        "--split",
        "test",
        env=_env(ls, tmp_path / "models"),
    )
    assert done.returncode == 0, done.stderr
    project = int(done.stdout.split("project ")[1].split()[0])
    tasks = ls.tasks(project)
    assert len(tasks) == 72  # BCCD's own test split
    assert all(t["total_annotations"] == 0 for t in tasks)  # kept aside, not imported as annotations
    config = ls.project(project)["label_config"]
    assert all(f'value="{label}"' in config for label in ("RBC", "WBC", "Platelets"))
    gt = json.loads((tmp_path / "models" / str(project) / "import" / "ground_truth.json").read_text())
    assert set(gt) == {str(t["id"]) for t in tasks}
    # Each task shows its own file, and the kept-aside boxes belong to that file.
    some = tasks[5]
    stored = gt[str(some["id"])]
    assert stored["split"] == "test" and some["data"]["image"].endswith("-" + Path(stored["file"]).name)
    assert stored["result"] and all(
        r["value"]["rectanglelabels"][0] in ("RBC", "WBC", "Platelets") for r in stored["result"]
    )
    # The uploaded image is the dataset's image (same size as the boxes were written for).
    r = ls.api("GET", some["data"]["image"])
    from io import BytesIO

    with Image.open(BytesIO(r.content)) as im:
        assert im.size == (stored["result"][0]["original_width"], stored["result"][0]["original_height"])


def _tiny_voc(root: Path, n: int = 4) -> None:
    (root / "Annotations").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    for i in range(n):
        Image.new("RGB", (64, 48), (i * 40, 80, 120)).save(root / "JPEGImages" / f"im{i}.jpg")
        (root / "Annotations" / f"im{i}.xml").write_text(
            f"<annotation><filename>im{i}.jpg</filename><object><name>cell</name><bndbox>"
            f"<xmin>{5 + i}</xmin><ymin>6</ymin><xmax>40</xmax><ymax>30</ymax></bndbox></object></annotation>"
        )


def test_import_local_files_as_annotations(label_studio, tmp_path):
    ls = label_studio
    _tiny_voc(ls.files_root / "tiny-voc")
    done = _annoloop(
        "import",
        str(ls.files_root / "tiny-voc"),
        "--format",
        "voc",
        "--create",
        "tiny voc",
        "--storage",
        "local-files",
        "--document-root",
        str(ls.files_root),
        "--as-annotations",
        env=_env(ls, tmp_path / "models"),
    )
    assert done.returncode == 0, done.stderr
    project = int(done.stdout.split("project ")[1].split()[0])
    tasks = ls.tasks(project)
    assert len(tasks) == 4 and all(t["total_annotations"] == 1 for t in tasks)
    assert all(t["data"]["image"].startswith("/data/local-files/?d=tiny-voc") for t in tasks)
    ls.api("GET", tasks[0]["data"]["image"])  # served: the storage was registered
    assert not (tmp_path / "models" / str(project) / "import").exists()  # nothing kept aside


def test_import_errors_are_one_line(label_studio, tmp_path):
    ls = label_studio
    _tiny_voc(tmp_path / "voc")
    other = ls.create_project(
        "other labels",
        '<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image"><Label value="dog"/></RectangleLabels></View>',
    )
    cases = {
        "lacks the dataset's labels cell": (
            "import",
            str(tmp_path / "voc"),
            "--format",
            "voc",
            "--project",
            str(other),
        ),
        "is not a YOLO dataset": (
            "import",
            str(tmp_path / "voc"),
            "--format",
            "yolo",
            "--project",
            str(other),
        ),
        "not under the local-files document root": (
            "import",
            str(tmp_path / "voc"),
            "--format",
            "voc",
            "--create",
            "outside root",
            "--storage",
            "local-files",
            "--document-root",
            str(ls.files_root),
        ),
    }
    for expected, args in cases.items():
        done = _annoloop(*args, env=_env(ls, tmp_path / "models"))
        assert done.returncode == 1, done.stdout
        assert expected in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert ls.tasks(other) == []


def test_connect_with_basic_auth_is_idempotent(label_studio, tmp_path, starter_weights):
    ls = label_studio
    model_dir = tmp_path / "models"
    publish(model_dir, starter_weights("detect"), "starter")
    auth = {"BASIC_AUTH_USER": "ls", "BASIC_AUTH_PASS": "s3cret-pass"}
    backend = start_backend(tmp_path, {"MODEL_DIR": str(model_dir), **auth})
    try:
        project = ls.create_project(
            "connect me",
            '<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image"><Label value="circle"/></RectangleLabels></View>',
        )
        env = {**_env(ls, model_dir), **auth}
        first = _annoloop("connect", "--project", str(project), "--url", backend.url, env=env)
        assert first.returncode == 0, first.stderr
        assert "connected" in first.stdout and "basic auth" in first.stdout
        again = _annoloop("connect", "--project", str(project), "--url", backend.url, env=env)
        assert again.returncode == 0 and "updated" in again.stdout, again.stderr
        backends = ls.ml_backends(project)
        assert len(backends) == 1 and backends[0]["auth_method"] == "BASIC_AUTH"
        assert backends[0]["state"] == "CO"  # connected: health and setup passed with basic auth
        hooks = [h for h in ls.webhooks(project) if h["url"].startswith(backend.url)]
        assert hooks and hooks[0]["headers"].get("Authorization", "").startswith("Basic ")
        info = ls.project(project)
        assert info["sampling"] == "Uncertainty sampling" and info["show_collab_predictions"]
        assert "s3cret-pass" not in first.stdout + first.stderr + again.stdout + again.stderr
    finally:
        backend.stop()
