"""End to end with a real Label Studio 1.23.2: it calls the backend and stores the predictions.

Every assertion reads Label Studio's own API: what it stored is what annotators see.
"""

from __future__ import annotations

import shutil
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import requests
from PIL import Image

from tests.conftest import SHARED, publish, start_backend
from training.evaluate import box_iou
from training.synthetic import render_scene

pytestmark = pytest.mark.labelstudio

SHAPES_CONFIG = """<View><Image name="image" value="$image"/>
<RectangleLabels name="label" toName="image">
  <Label value="Circle"/><Label value="Square"/><Label value="Triangle"/>
</RectangleLabels></View>"""
BCCD = SHARED / "datasets" / "bccd" / "BCCD"
LABELS = ("Circle", "Square", "Triangle")


def personal_access_token(ls) -> str:
    """A JWT personal access token, the kind Label Studio 1.23 recommends over legacy tokens."""
    ls.api("POST", "/api/jwt/settings", json={"api_tokens_enabled": True, "legacy_api_tokens_enabled": True})
    token = ls.api("POST", "/api/token/", expected=(201,)).json()["token"]
    assert token.count(".") == 2  # a JWT, not a legacy key
    return token


@pytest.fixture(scope="module")
def backend_for_ls(label_studio, tmp_path_factory, starter_weights, redis_url):
    work = tmp_path_factory.mktemp("ls-backend")
    model_dir = work / "models"
    publish(model_dir, starter_weights("detect"), "shapes-v1")
    b = start_backend(
        work,
        {
            "MODEL_DIR": str(model_dir),
            "REDIS_URL": redis_url,
            "LABEL_STUDIO_URL": label_studio.url,
            "LABEL_STUDIO_API_KEY": personal_access_token(label_studio),
        },
    )
    yield b
    b.stop()


def test_label_studio_stores_prelabels_from_the_backend(label_studio, backend_for_ls):
    ls = label_studio
    rng = np.random.default_rng(2024)
    folder = ls.files_root / "shapes"
    folder.mkdir(parents=True, exist_ok=True)
    truth = {}
    for i in range(6):
        rgb, shapes = render_scene(rng, 320, 240, max_shapes=3)
        Image.fromarray(rgb).save(folder / f"s{i}.png")
        truth[f"s{i}.png"] = shapes
    project = ls.create_project("annoloop shapes", SHAPES_CONFIG)
    ls.add_local_storage(project, "shapes")
    ids = ls.import_tasks(project, [{"image": ls.local_file_url(f"shapes/{name}")} for name in truth])
    # One more image through Label Studio's own upload (a /data/upload/... URL).
    rgb, upload_shapes = render_scene(rng, 320, 240, max_shapes=3)
    upload_path = folder.parent / "upload.png"
    Image.fromarray(rgb).save(upload_path)
    upload_ids, _ = ls.upload_file(project, upload_path)
    names = {tid: name for tid, name in zip(ids, truth, strict=True)}
    truth["upload"] = upload_shapes
    names[upload_ids[0]] = "upload"

    ls.connect_ml_backend(project, backend_for_ls.url, title="annoloop")
    ls.request_predictions(project)

    matched = total = 0
    for task_id, name in names.items():
        preds = ls.predictions(task_id)
        assert len(preds) == 1, f"task {task_id}: {preds}"
        pred = preds[0]
        assert pred["model_version"] == "shapes-v1"
        assert 0.0 <= pred["score"] <= 1.0
        for region in pred["result"]:
            assert region["type"] == "rectanglelabels" and region["score"] >= 0.25
            assert region["value"]["rectanglelabels"][0] in LABELS
        for shape in truth[name]:
            total += 1
            boxes = [
                (
                    r["value"]["x"] * 3.2,
                    r["value"]["y"] * 2.4,
                    (r["value"]["x"] + r["value"]["width"]) * 3.2,
                    (r["value"]["y"] + r["value"]["height"]) * 2.4,
                )
                for r in pred["result"]
                if r["value"]["rectanglelabels"] == [LABELS[shape.cls]]
            ]
            matched += max((float(box_iou([b], [shape.box])[0, 0]) for b in boxes), default=0) >= 0.5
    assert matched / total >= 0.7, f"{matched}/{total} shapes matched"
    # The queue needs distinct scores to order anything.
    scores = {ls.predictions(t)[0]["score"] for t in names}
    assert len(scores) > 1
    backend = ls.ml_backends(project)[0]
    assert backend["model_version"] == "shapes-v1"


def test_bccd_images_through_the_same_path(label_studio, backend_for_ls):
    """Real photos (BCCD, 640x480 JPEG) served by Label Studio, labels mapped with predicted_values."""
    ls = label_studio
    folder = ls.files_root / "bccd"
    folder.mkdir(parents=True, exist_ok=True)
    names = sorted(p.name for p in (BCCD / "JPEGImages").glob("*.jpg"))[:8]
    assert names, f"BCCD not found at {BCCD} (set ANNOLOOP_SHARED_DIR to the shared folder)"
    for name in names:  # into Label Studio's temporary files root, not the repository
        shutil.copy(BCCD / "JPEGImages" / name, folder / name)
    config = """<View><Image name="image" value="$image"/><RectangleLabels name="cells" toName="image">
      <Label value="RBC" predicted_values="circle"/><Label value="WBC" predicted_values="square"/>
      <Label value="Platelets" predicted_values="triangle"/></RectangleLabels></View>"""
    project = ls.create_project("annoloop bccd", config)
    ls.add_local_storage(project, "bccd")
    ids = ls.import_tasks(project, [{"image": ls.local_file_url(f"bccd/{n}")} for n in names])
    ls.connect_ml_backend(project, backend_for_ls.url, title="annoloop")
    ls.request_predictions(project)
    for task_id, name in zip(ids, names, strict=True):
        (pred,) = ls.predictions(task_id)
        assert pred["model_version"] == "shapes-v1"
        assert 0.0 <= pred["score"] <= 1.0
        size = ET.parse(BCCD / "Annotations" / name.replace(".jpg", ".xml")).find("size")
        for region in pred["result"]:
            assert (region["original_width"], region["original_height"]) == (
                int(size.find("width").text),
                int(size.find("height").text),
            )
            assert region["value"]["rectanglelabels"][0] in ("RBC", "WBC", "Platelets")
            assert region["from_name"] == "cells"


def test_a_project_of_other_classes_connects_to_the_default_model_but_not_to_a_wrong_own_model(
    label_studio, backend_for_ls, starter_weights
):
    """Only the default (shapes) model is served: a cats project still connects (its first training will
    start from those weights) and gets no pre-labels; a project whose *own* model cannot fill its config is
    refused at connection, with the reason in our log (Label Studio shows only "400 ... /setup")."""
    ls = label_studio
    config = '<View><Image name="image" value="$image"/><RectangleLabels name="l" toName="image"><Label value="Cat"/></RectangleLabels></View>'

    def connect(project: int) -> requests.Response:
        return requests.post(
            f"{ls.url}/api/ml",
            headers={"Authorization": f"Token {ls.token}"},
            timeout=60,
            json={"url": backend_for_ls.url, "project": project, "title": "annoloop", "auth_method": "NONE"},
        )

    cats = ls.create_project("annoloop cats", config)
    r = connect(cats)
    assert r.status_code == 201, r.text
    r = requests.post(
        backend_for_ls.url + "/predict",
        json={
            "tasks": [{"id": 1, "data": {"image": "/nowhere.png"}}],
            "project": f"{cats}.1",
            "label_config": config,
        },
        timeout=60,
    )
    assert r.status_code == 200 and r.json()["results"] == [] and r.json()["model_version"] is None
    assert "knows none of this project's labels" in r.json()["error"]

    own = ls.create_project("annoloop cats with a shapes model of their own", config)
    publish(backend_for_ls.log.parent / "models", starter_weights("detect"), "own-v1", project=str(own))
    r = connect(own)
    assert r.status_code == 400 and "/setup" in r.text
    assert "maps to a model class" in backend_for_ls.log.read_text()


def test_basic_auth_backend_and_its_webhook(label_studio, tmp_path, starter_weights, redis_url):
    """Label Studio sends basic auth on /health, /setup, /predict, but its webhook needs the header set."""
    import base64
    import json
    import time

    ls = label_studio
    model_dir = tmp_path / "models"
    publish(model_dir, starter_weights("detect"), "shapes-v1")
    user, password = "ls-backend", "b4sic-s3cret"
    b = start_backend(
        tmp_path,
        {
            "MODEL_DIR": str(model_dir),
            "REDIS_URL": redis_url,
            "LABEL_STUDIO_URL": ls.url,
            "LABEL_STUDIO_API_KEY": ls.token,
            "BASIC_AUTH_USER": user,
            "BASIC_AUTH_PASS": password,
        },
    )
    try:
        folder = ls.files_root / "auth"
        folder.mkdir(parents=True, exist_ok=True)
        rgb, _ = render_scene(np.random.default_rng(1), 320, 240, max_shapes=2)
        Image.fromarray(rgb).save(folder / "a.png")
        project = ls.create_project("annoloop auth", SHAPES_CONFIG)
        ls.add_local_storage(project, "auth")
        (task_id,) = ls.import_tasks(project, [{"image": ls.local_file_url("auth/a.png")}])
        ls.connect_ml_backend(project, b.url, title="annoloop", basic_auth=(user, password))
        ls.request_predictions(project)
        (pred,) = ls.predictions(task_id)
        assert pred["model_version"] == "shapes-v1"

        (hook,) = [h for h in ls.webhooks(project) if h["url"].startswith(b.url)]
        basic = base64.b64encode(f"{user}:{password}".encode()).decode()
        ls.api("PATCH", f"/api/webhooks/{hook['id']}/", json={"headers": {"Authorization": f"Basic {basic}"}})
        ls.api(
            "POST",
            f"/api/tasks/{task_id}/annotations/",
            expected=(201,),
            json={"result": pred["result"], "was_cancelled": False},
        )
        deadline = time.monotonic() + 10
        actions: list[str] = []
        while time.monotonic() < deadline and "ANNOTATION_CREATED" not in actions:
            events = [json.loads(line) for line in b.log.read_text().splitlines() if line.startswith("{")]
            actions = [e.get("action") for e in events if e.get("event") == "webhook"]
            time.sleep(0.2)
        assert "ANNOTATION_CREATED" in actions, "the webhook with the basic-auth header did not get through"
    finally:
        b.stop()
    assert password not in b.log.read_text()
