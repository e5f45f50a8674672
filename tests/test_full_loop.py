"""The whole loop on real parts, each step asserted from Label Studio's side.

Import tasks -> predictions appear -> the sync orders the queue -> annotations through the API in queue order
-> webhooks -> retraining on a real `annoloop worker` -> promotion -> the backend serves the new version ->
the worker's sync after promotion re-ranks the queue with it.
"""

from __future__ import annotations

import time

import pytest
import redis
from rq.job import Job

from annoloop.labelstudio import LabelStudioAccess
from annoloop.model_store import ModelStore
from annoloop.project_setup import connect_backend
from config.settings import Settings
from sync.job import sync_project
from tests.conftest import gt_result, shapes_project, start_loop

pytestmark = pytest.mark.labelstudio


def _wait(check, timeout: float, what: str, loop) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        assert loop.worker.poll() is None, loop.worker_log.read_text()[-3000:]
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}\n{loop.worker_log.read_text()[-3000:]}")


def test_import_predict_sync_label_retrain_promote_serve_resync(
    label_studio, tmp_path, redis_url, starter_weights
):
    ls = label_studio
    loop = start_loop(
        tmp_path,
        ls,
        redis_url,
        starter_weights("detect"),
        min_new_annotations=8,
        base_epochs=2,
        finetune_epochs=1,
        # Which 8 tasks get labeled is the ranking's choice; at 0.2 none of them may fall on the held-out side
        # (then nothing can be promoted, rightly). At 0.5 all 8 on one side has odds of 1 in 128.
        holdout_fraction=0.5,
    )
    settings = Settings(
        label_studio={"url": ls.url, "api_key": ls.token},
        model_dir=loop.model_dir,
        redis_url=redis_url,
        log_level="WARNING",
    )
    try:
        # Import: tasks exist, nothing labeled.
        project, ids, shapes = shapes_project(ls, "full-loop", 24, seed=5, title="full loop")
        assert [t["total_annotations"] for t in ls.tasks(project)] == [0] * 24
        report = connect_backend(LabelStudioAccess(settings.label_studio), project, loop.backend.url)
        assert report.created and ls.project(project)["sampling"] == "Uncertainty sampling"

        # Predictions appear: Label Studio asks the backend and stores pre-labels of the served model.
        ls.request_predictions(project, ids[:2])
        stored = [p for t in ids[:2] for p in ls.predictions(t)]
        assert {p["model_version"] for p in stored} == {"starter"} and all(p["result"] for p in stored)

        # The sync orders the queue: Label Studio serves the ranking's first task.
        first = sync_project(project, settings)
        assert ls.project(project)["model_version"] == first.sync_version
        assert ls.api("GET", f"/api/projects/{project}/next").json()["id"] == first.top[0]["task"]

        # An annotator labels in the order Label Studio serves; the 8th annotation's webhook starts training.
        served = []
        for _ in range(8):
            task = ls.api("GET", f"/api/projects/{project}/next").json()["id"]
            served.append(task)
            ls.api(
                "POST", f"/api/tasks/{task}/annotations", json={"result": gt_result(shapes[ids.index(task)])}
            )
        assert served[0] == first.top[0]["task"] and len(set(served)) == 8
        assert sum(t["total_annotations"] for t in ls.tasks(project)) == 8

        # Retraining and promotion on the worker.
        store = ModelStore(loop.model_dir)
        promoted = _wait(lambda: store.current(str(project)), 600, "a promoted version", loop)
        assert promoted.version.startswith("v001-")
        assert sorted(
            promoted.metadata()["task_ids"]["train"] + promoted.metadata()["task_ids"]["holdout"]
        ) == sorted(served)

        # The backend serves the new version: Label Studio stores its predictions for a task still to label.
        fresh = next(t for t in ids if t not in served)

        def predicted_by_new_version() -> bool:
            ls.request_predictions(project, [fresh])
            return any(p["model_version"] == promoted.version for p in ls.predictions(fresh))

        _wait(predicted_by_new_version, 60, "a prediction of the new version", loop)

        # The worker's sync after promotion re-ranks with the new model: Label Studio's queue follows it.
        conn = redis.Redis.from_url(redis_url)
        job_id = f"annoloop-sync-{project}-{promoted.version}"
        job = _wait(
            lambda: Job.exists(job_id, connection=conn) and Job.fetch(job_id, connection=conn),
            30,
            "the sync job",
            loop,
        )
        _wait(
            lambda: job.get_status(refresh=True) in ("finished", "failed"), 600, "the sync job to end", loop
        )
        assert job.get_status() == "finished", job.latest_result().exc_string if job.latest_result() else ""
        resync = job.return_value()
        assert resync["model_version"] == promoted.version and resync["labeled"] == 8
        assert resync["pool"] == 16 and resync["written"] == 16
        info = ls.project(project)
        assert info["model_version"] == resync["sync_version"] and resync["sync_version"].startswith(
            promoted.version + "@"
        )
        versions = ls.api("GET", f"/api/projects/{project}/model-versions/").json()
        assert versions[resync["sync_version"]] == 16 and first.sync_version not in versions
        assert ls.api("GET", f"/api/projects/{project}/next").json()["id"] == resync["top"][0]["task"]
    finally:
        loop.stop()
