"""The retrain loop on real parts: annotations in Label Studio -> its webhooks -> Redis count -> RQ job on a
real `annoloop worker` -> training -> promotion -> the running backend swaps -> Label Studio stores
predictions of the new version. Asserted from Label Studio's side where it can see it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml
from PIL import Image

from annoloop.model_store import ModelStore
from tests.conftest import publish, start_backend
from training.synthetic import render_scene

pytestmark = pytest.mark.labelstudio

CONFIG = """<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">
<Label value="circle"/><Label value="square"/><Label value="triangle"/></RectangleLabels></View>"""
LABELS = ("circle", "square", "triangle")
W, H = 320, 240


def gt_result(shapes) -> list[dict]:
    out = []
    for i, s in enumerate(shapes):
        x0, y0, x1, y1 = s.box
        out.append(
            {
                "id": f"gt{i}",
                "from_name": "label",
                "to_name": "image",
                "type": "rectanglelabels",
                "original_width": W,
                "original_height": H,
                "image_rotation": 0,
                "value": {
                    "x": 100 * x0 / W,
                    "y": 100 * y0 / H,
                    "width": 100 * (x1 - x0) / W,
                    "height": 100 * (y1 - y0) / H,
                    "rotation": 0,
                    "rectanglelabels": [LABELS[s.cls]],
                },
            }
        )
    return out


def test_annotations_retrain_and_the_backend_serves_the_new_version(
    label_studio, tmp_path, redis_url, starter_weights
):
    ls = label_studio
    model_dir = tmp_path / "models"
    publish(model_dir, starter_weights("detect"), "starter")
    config = tmp_path / "annoloop.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "training": {
                    "min_new_annotations": 10,
                    "imgsz": 128,
                    "batch": 8,
                    "base_epochs": 2,
                    "finetune_epochs": 1,
                    "workers": 0,
                    "holdout_fraction": 0.5,
                    "min_improvement": -1.0,  # promote whatever comes out
                    "train_args": {"nbs": 8, "close_mosaic": 1},
                }
            }
        )
    )
    env = {
        "MODEL_DIR": str(model_dir),
        "REDIS_URL": redis_url,
        "LABEL_STUDIO_URL": ls.url,
        "LABEL_STUDIO_API_KEY": ls.token,
        "ANNOLOOP_CONFIG": str(config),
    }
    backend = start_backend(tmp_path, env)
    worker_log = tmp_path / "worker.log"
    worker = subprocess.Popen(
        [str(Path(sys.executable).parent / "annoloop"), "worker"],
        env={**os.environ, **env},
        stdout=worker_log.open("w"),
        stderr=subprocess.STDOUT,
    )
    try:
        folder = ls.files_root / "loop"
        folder.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(11)
        shapes = []
        for i in range(14):
            rgb, s = render_scene(rng, W, H, max_shapes=3)
            Image.fromarray(rgb).save(folder / f"{i}.png")
            shapes.append(s)
        project = ls.create_project("annoloop loop", CONFIG)
        ls.add_local_storage(project, "loop")
        ids = ls.import_tasks(project, [{"image": ls.local_file_url(f"loop/{i}.png")} for i in range(14)])
        ls.connect_ml_backend(project, backend.url, title="annoloop")
        ls.request_predictions(project)
        assert {p["model_version"] for t in ids for p in ls.predictions(t)} == {"starter"}

        # An annotator labels ten tasks; each submission fires ANNOTATION_CREATED at the backend's webhook.
        for task_id, s in zip(ids[:10], shapes[:10], strict=True):
            ls.api(
                "POST",
                f"/api/tasks/{task_id}/annotations/",
                expected=(201,),
                json={"result": gt_result(s), "was_cancelled": False},
            )

        store = ModelStore(model_dir)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and store.current(str(project)) is None:
            assert worker.poll() is None, worker_log.read_text()[-3000:]
            time.sleep(1)
        promoted = store.current(str(project))
        assert promoted is not None, "no version was promoted:\n" + worker_log.read_text()[-3000:]
        assert promoted.version.startswith("v001-")
        card = promoted.metadata()
        assert sorted(card["task_ids"]["train"] + card["task_ids"]["holdout"]) == sorted(ids[:10])

        # The running backend swaps within about a second; Label Studio then stores predictions of the new
        # version for the tasks still to label.
        deadline = time.monotonic() + 15
        version = None
        while time.monotonic() < deadline and version != promoted.version:
            version = (
                requests.get(backend.url + "/health", timeout=5)
                .json()["models"]
                .get(str(project), {})
                .get("model_version")
            )
            time.sleep(0.2)
        assert version == promoted.version
        ls.request_predictions(project, ids[10:])
        for task_id in ids[10:]:
            versions = {p["model_version"] for p in ls.predictions(task_id)}
            assert promoted.version in versions, (task_id, versions)
        assert ls.ml_backends(project)[0]["model_version"] == promoted.version
    finally:
        worker.terminate()
        worker.wait(30)
        backend.stop()
