"""The retrain loop on real parts: annotations in Label Studio -> its webhooks -> Redis count -> RQ job on a
real `annoloop worker` -> training -> promotion -> the running backend swaps -> Label Studio stores
predictions of the new version. Asserted from Label Studio's side where it can see it."""

from __future__ import annotations

import time

import pytest
import requests

from annoloop.model_store import ModelStore
from tests.conftest import gt_result, shapes_project, start_loop

pytestmark = pytest.mark.labelstudio


def test_annotations_retrain_and_the_backend_serves_the_new_version(
    label_studio, tmp_path, redis_url, starter_weights
):
    ls = label_studio
    loop = start_loop(
        tmp_path,
        ls,
        redis_url,
        starter_weights("detect"),
        min_new_annotations=10,
        base_epochs=2,
        finetune_epochs=1,
        holdout_fraction=0.5,
    )
    backend, worker, worker_log, model_dir = loop.backend, loop.worker, loop.worker_log, loop.model_dir
    try:
        project, ids, shapes = shapes_project(ls, "loop", 14, seed=11, title="annoloop loop")
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
        loop.stop()
