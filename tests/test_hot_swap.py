"""Hot-swap: a promoted or rolled-back version is served without a restart and without a failed request."""

from __future__ import annotations

import shutil
import threading
import time

import requests

from annoloop.model_store import ModelStore
from tests.conftest import ImageServer, publish, start_backend

CONFIG = """<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">
<Label value="circle"/><Label value="square"/><Label value="triangle"/></RectangleLabels></View>"""


def test_promotion_under_load_fails_no_request_and_never_goes_back(
    tmp_path, redis_url, starter_weights, image_server: ImageServer
):
    model_dir = tmp_path / "models"
    publish(model_dir, starter_weights("detect"), "v001", project="4")
    b = start_backend(
        tmp_path,
        {
            "MODEL_DIR": str(model_dir),
            "REDIS_URL": redis_url,
            "LABEL_STUDIO_URL": image_server.url,
            "LABEL_STUDIO_API_KEY": "tok-123456",
        },
    )
    scenes = image_server.write_scenes(2, seed=77)
    body = {
        "tasks": [{"data": {"image": "/" + s.name}} for s in scenes],
        "label_config": CONFIG,
        "project": "4.1700000000",
    }
    seen: dict[int, list[str]] = {i: [] for i in range(4)}
    failures: list[str] = []
    stop = threading.Event()

    def hammer(i: int) -> None:
        session = requests.Session()
        while not stop.is_set():
            try:
                r = session.post(b.url + "/predict", json=body, timeout=60)
                if r.status_code != 200:
                    failures.append(f"{r.status_code} {r.text[:200]}")
                    continue
                items = r.json()["results"]
                versions = {x["model_version"] for x in items}
                if len(versions) != 1 or any("error" in x for x in items):
                    failures.append(f"mixed or failed results: {items}")
                seen[i].append(r.json()["model_version"])
            except requests.RequestException as e:
                failures.append(repr(e))

    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(4)]
    try:
        for t in threads:
            t.start()
        time.sleep(3)
        # A new version: different weights file, published the way training publishes (folder, then pointer).
        copy = tmp_path / "candidate.pt"
        shutil.copy(starter_weights("detect"), copy)
        promoted_at = time.monotonic()
        ModelStore(model_dir).publish("4", "v002", copy, {"source": "test"})
        deadline = promoted_at + 20
        while time.monotonic() < deadline and not all(s and s[-1] == "v002" for s in seen.values()):
            time.sleep(0.1)
        noticed = time.monotonic() - promoted_at
        time.sleep(1)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    try:
        assert not failures, failures[:3]
        for i, versions in seen.items():
            assert versions, f"thread {i} got no answer"
            assert versions[0] == "v001" and versions[-1] == "v002", (i, versions[0], versions[-1])
            first_new = versions.index("v002")
            assert all(v == "v002" for v in versions[first_new:]), f"thread {i} went back to v001"
        assert noticed < 10, f"the new version took {noticed:.1f}s to be served"
        health = requests.get(b.url + "/health", timeout=5).json()
        assert health["models"]["4"]["model_version"] == "v002"
        # Back to one model in memory (v001 was freed): the default project has no model here.
        assert health["loaded_models"] == 1
    finally:
        b.stop()


def test_rollback_moves_the_pointer_back_and_the_backend_follows(tmp_path, redis_url, starter_weights):
    model_dir = tmp_path / "models"
    publish(model_dir, starter_weights("detect"), "v001", project="6")
    publish(model_dir, starter_weights("detect"), "v002", project="6")
    b = start_backend(tmp_path, {"MODEL_DIR": str(model_dir), "REDIS_URL": redis_url})
    try:
        setup = {"project": "6.1", "schema": CONFIG}
        assert requests.post(b.url + "/setup", json=setup, timeout=5).json()["model_version"] == "v002"
        ModelStore(model_dir).set_current("6", "v001")
        deadline = time.monotonic() + 10
        version = None
        while time.monotonic() < deadline and version != "v001":
            version = requests.post(b.url + "/setup", json=setup, timeout=5).json()["model_version"]
            time.sleep(0.1)
        assert version == "v001"
    finally:
        b.stop()
