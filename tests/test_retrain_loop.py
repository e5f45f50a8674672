"""The retrain loop on real parts: annotations in Label Studio -> its webhooks -> Redis count -> RQ job on a
real `annoloop worker` -> training -> promotion -> the running backend swaps -> Label Studio stores
predictions of the new version -> annotators correct those pre-labels -> the next training records what they
changed. Asserted from Label Studio's side where it can see it."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
import requests

from annoloop.model_store import ModelStore
from config.settings import TrainingSettings
from tests.conftest import SCENE_H, SCENE_W, SHAPE_LABELS, gt_result, shapes_project, start_loop
from training.convergence import history_path, read_history
from training.trigger import request_training

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
        # Whatever the worker does after a promotion (the ranking job re-ranks the queue, and replaces its own
        # older predictions) is done before annotators start on the new pre-labels.
        wait_until_idle(redis.Redis.from_url(redis_url), worker, worker_log)

        # Annotators open the remaining tasks with v001's pre-labels and submit them, some kept, one moved,
        # one relabeled, one deleted, and a box the model missed drawn. The editor sends the prediction it
        # started from as parent_prediction; one task's pre-labels were written by the ranking job, whose
        # predictions carry "<version>@<stamp>".
        expected = review_prelabels(ls, promoted.version, ids[10:])
        # The next training records it: asked for by hand, as "Start Training" does (four annotations are below
        # the threshold, and v001 may have paused automatic retraining by reaching the target already).
        outcome = request_training(
            redis.Redis.from_url(redis_url), project, force=True, reason="test", settings=TrainingSettings()
        )
        assert outcome.status == "enqueued", outcome
        history = history_path(model_dir, str(project))
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and len(read_history(history)) < 2:
            assert worker.poll() is None, worker_log.read_text()[-3000:]
            time.sleep(1)
        rows = read_history(history)
        assert len(rows) == 2, "no second training:\n" + worker_log.read_text()[-3000:]
        second = rows[1]
        card = _card(second.model_card)  # promoted or not, the card of the training after v001
        # Only v001's pre-labels were reviewed: the first ten tasks were labeled from scratch.
        assert list(card["prelabel_review"]["versions"]) == [promoted.version]
        got = card["prelabel_review"]["versions"][promoted.version]
        assert {k: got[k] for k in expected} == expected
        assert got["acceptance_rate"] == round(expected["accepted"] / expected["predicted"], 4)
        # The history row has the served version's review; `annoloop models` and `status` show it.
        assert (second.prelabel_version, second.prelabel_predicted, second.prelabel_accepted) == (
            promoted.version,
            expected["predicted"],
            expected["accepted"],
        )
        assert (second.prelabel_rejected, second.prelabel_added) == (1, 1)
        env = {**os.environ, "MODEL_DIR": str(model_dir), "REDIS_URL": redis_url}
        exe = str(Path(sys.executable).parent / "annoloop")
        models = subprocess.run(
            [exe, "models", "--project", str(project)], env=env, capture_output=True, text=True, timeout=60
        )
        line = next(x for x in models.stdout.splitlines() if promoted.version in x.split()[:2])
        assert line.split()[-2:] == [
            str(expected["predicted"]),
            f"{expected['accepted'] / expected['predicted']:.0%}",
        ]
        status = subprocess.run(
            [exe, "status", "--project", str(project)], env=env, capture_output=True, text=True, timeout=60
        )
        assert f"pre-labels:    {promoted.version}: {expected['predicted']} pre-labels" in status.stdout
    finally:
        loop.stop()


def wait_until_idle(conn: redis.Redis, worker: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    """Until the `annoloop worker` process has no job running and nothing waiting on its queues."""
    from rq import Queue, Worker

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert worker.poll() is None, log.read_text()[-3000:]
        (w,) = [w for w in Worker.all(connection=conn) if w.pid == worker.pid]
        queues = [Queue(name, connection=conn) for name in w.queue_names()]
        if w.get_state() == "idle" and not any(q.count for q in queues):
            return
        time.sleep(0.5)
    raise AssertionError("the worker did not become idle:\n" + log.read_text()[-3000:])


def _card(path: str) -> dict:
    return json.loads(Path(path).read_text())


def _overlaps(a: dict, b: dict) -> bool:
    return (
        a["x"] < b["x"] + b["width"]
        and b["x"] < a["x"] + a["width"]
        and a["y"] < b["y"] + b["height"]
        and b["y"] < a["y"] + a["height"]
    )


def review_prelabels(ls, version: str, task_ids: list[int]) -> dict[str, int]:
    """Submit annotations made from ``version``'s pre-labels on ``task_ids`` with known edits, as the editor
    submits them (``parent_prediction``); returns the counts the review must find."""
    preds = {}
    for i, task_id in enumerate(task_ids):
        stored = ls.predictions(task_id)
        pred = next(p for p in stored if p["model_version"] == version)
        if i == len(task_ids) - 1:  # the last task's pre-labels as the ranking job writes them
            stamped = [p for p in stored if p["model_version"].startswith(version + "@")]
            pred = (
                stamped[0]
                if stamped
                else ls.api(
                    "POST",
                    "/api/predictions",
                    json={
                        "task": task_id,
                        "result": pred["result"],
                        "score": pred["score"],
                        "model_version": f"{version}@20261122T103000Z",
                    },
                ).json()
            )
        preds[task_id] = pred
    regions = [
        (t, j)
        for t in task_ids
        for j, r in enumerate(preds[t]["result"])
        if r.get("type") == "rectanglelabels"
    ]
    if len(regions) < 4:
        pytest.fail(
            f"{version} pre-labeled only {len(regions)} regions on {len(task_ids)} tasks; the test needs 4"
        )
    edits = {
        regions[1]: "move",
        regions[2]: "relabel",
        regions[3]: "delete",
    }  # the others are kept as they are
    for task_id in task_ids:
        annotation = []
        for j, region in enumerate(preds[task_id]["result"]):
            edit = edits.get((task_id, j))
            if region.get("type") != "rectanglelabels" or edit == "delete":
                continue
            region = copy.deepcopy(region)
            v = region["value"]
            if edit == "move":  # by a quarter of its width: IoU 0.6, a correction
                shift = v["width"] / 4
                v["x"] = v["x"] + shift if v["x"] + v["width"] + shift <= 100 else v["x"] - shift
            elif edit == "relabel":
                v["rectanglelabels"] = [next(x for x in SHAPE_LABELS if x != v["rectanglelabels"][0])]
            annotation.append(region)
        if task_id == task_ids[-1]:  # a box the model missed, where it predicted nothing
            spot = next(
                {"x": x, "y": y, "width": 4, "height": 4}
                for x in (1, 95, 48)
                for y in (1, 95, 48)
                if not any(
                    _overlaps({"x": x, "y": y, "width": 4, "height": 4}, r["value"]) for r in annotation
                )
            )
            annotation.append(
                {
                    "from_name": "label",
                    "to_name": "image",
                    "type": "rectanglelabels",
                    "original_width": SCENE_W,
                    "original_height": SCENE_H,
                    "value": {**spot, "rotation": 0, "rectanglelabels": ["circle"]},
                }
            )
        saved = ls.api(
            "POST",
            f"/api/tasks/{task_id}/annotations/",
            expected=(201,),
            json={"result": annotation, "was_cancelled": False, "parent_prediction": preds[task_id]["id"]},
        ).json()
        assert saved["parent_prediction"] == preds[task_id]["id"]  # Label Studio keeps it, as from the editor
    edited = {t for t, _ in edits} | {task_ids[-1]}
    n = len(regions)
    return {
        "tasks": len(task_ids),
        "tasks_unchanged": len([t for t in task_ids if t not in edited]),
        "predicted": n,
        "annotated": n,  # one pre-label deleted, one box drawn
        "accepted": n - 3,
        "corrected": 2,
        "corrected_box": 1,
        "corrected_label": 1,
        "rejected": 1,
        "added": 1,
    }
