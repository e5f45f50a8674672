"""Retraining triggers on real parts: `annoloop serve` over HTTP, a real redis-server, real rq queues and workers.

State is read straight from Redis and rq. The training job itself (training.jobs.train_project) is not run:
these tests check what is enqueued, and run a real worker on the diagnostic `training.queue.ping` job.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import redis
import requests
from rq import Queue
from rq.job import Job, JobStatus

from config.settings import TrainingSettings
from tests.conftest import VENV_BIN, free_port, publish, start_backend, start_redis
from training import trigger
from training.queue import PING_FUNC, TRAIN_FUNC
from training.trigger import keys, mark_finished, mark_started, pause, project_state, request_training

THRESHOLD = 20
DETECT_CONFIG = """<View><Image name="image" value="$image"/>
<RectangleLabels name="label" toName="image">
  <Label value="Circle"/><Label value="Square"/><Label value="Triangle"/>
</RectangleLabels></View>"""


# --- Fixtures ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def db_url(redis_url) -> str:
    """A database of the session's redis-server of its own, so flushing it disturbs no other test."""
    return redis_url.rsplit("/", 1)[0] + "/7"


@pytest.fixture
def r(db_url) -> redis.Redis:
    client = redis.Redis.from_url(db_url)
    client.flushdb()
    return client


@pytest.fixture(scope="module")
def config_file(tmp_path_factory) -> Path:
    f = tmp_path_factory.mktemp("trigger-config") / "annoloop.yaml"
    f.write_text(f"training:\n  min_new_annotations: {THRESHOLD}\n")
    return f


@pytest.fixture(scope="module")
def backend(tmp_path_factory, db_url, config_file):
    work = tmp_path_factory.mktemp("trigger-backend")
    b = start_backend(
        work, {"MODEL_DIR": str(work / "models"), "REDIS_URL": db_url, "ANNOLOOP_CONFIG": str(config_file)}
    )
    yield b
    b.stop()


def training_queue_of(r: redis.Redis) -> Queue:
    return Queue("training", connection=r)


def annotation_created(project: int, task: int = 1, cancelled: bool = False, where: str = "project") -> dict:
    """An ANNOTATION_CREATED body shaped like Label Studio 1.23's (only the fields that matter here, plus a
    few it sends). ``where`` picks which of the three places carries the project id."""
    ann = {"id": task * 10, "result": [], "was_cancelled": cancelled, "task": task, "lead_time": 3.2}
    body: dict = {"action": "ANNOTATION_CREATED", "annotation": ann, "task": {"id": task, "data": {}}}
    if where == "project":
        body["project"] = {"id": project, "title": "shapes", "label_config": "<View/>"}
    elif where == "annotation":
        ann["project"] = project
    else:
        body["task"]["project"] = project
    return body


def post(backend, body, **kw) -> requests.Response:
    return requests.post(backend.url + "/webhook", json=body, timeout=10, **kw)


def cli(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k not in ("ANNOLOOP_CONFIG", "REDIS_URL")}
    full_env.update(env)
    return subprocess.run(
        [str(VENV_BIN / "annoloop"), *args],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# --- The webhook -------------------------------------------------------------------------------------


def test_a_burst_of_concurrent_webhooks_enqueues_exactly_one_job(backend, r):
    bodies = [
        annotation_created(5, task=i, where=("project", "annotation", "task")[i % 3]) for i in range(60)
    ]
    with cf.ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(lambda b: post(backend, b), bodies))
    assert all(resp.status_code == 200 for resp in responses), [
        x.text for x in responses if x.status_code != 200
    ]
    answers = [resp.json() for resp in responses]
    # Every increment saw a different count: none was lost or applied twice.
    assert sorted(a["new_annotations"] for a in answers) == list(range(1, 61))
    assert int(r.get(keys(5).new_annotations)) == 60
    statuses = [a["status"] for a in answers]
    assert statuses.count("enqueued") == 1
    assert statuses.count("counted") == THRESHOLD - 1
    assert statuses.count("coalesced") == 60 - THRESHOLD
    (enqueued,) = [a for a in answers if a["status"] == "enqueued"]
    assert enqueued["new_annotations"] == THRESHOLD

    queue = training_queue_of(r)
    assert queue.job_ids == [enqueued["job_id"]]
    job = queue.fetch_job(enqueued["job_id"])
    assert job.func_name == TRAIN_FUNC
    assert job.args == ("5",) and job.kwargs == {"force": False}
    assert job.get_status() == JobStatus.QUEUED
    # The configured defaults: job timeout, TTLs, retries with backoff.
    assert job.timeout == 7200 and job.result_ttl == 604800 and job.failure_ttl == 2592000
    assert job.retries_left == 3 and job.retry_intervals == [10, 60, 300]
    state = project_state(r, 5)
    assert state["state"] == "queued" and state["job_id"] == job.id
    assert state["followup"] in (None, "1")  # at most one follow-up flag


def test_a_burst_while_training_runs_owes_exactly_one_followup(backend, r):
    first = post(backend, {"action": "START_TRAINING", "project": {"id": 6, "title": "p"}}).json()
    assert first["status"] == "enqueued"
    job_a = first["job_id"]
    assert mark_started(r, 6, job_id=job_a) == 0
    assert project_state(r, 6)["state"] == "running"

    bodies = [annotation_created(6, task=i) for i in range(45)]
    with cf.ThreadPoolExecutor(12) as pool:
        answers = [resp.json() for resp in pool.map(lambda b: post(backend, b), bodies)]
    assert sorted(a["new_annotations"] for a in answers) == list(range(1, 46))
    # Counts from 20 on are triggers: they all fold into one follow-up, none enqueues a job.
    assert [a["status"] for a in answers].count("followup") == 45 - THRESHOLD + 1
    assert "enqueued" not in [a["status"] for a in answers]
    queue = training_queue_of(r)
    assert queue.job_ids == [job_a]
    assert r.get(keys(6).followup) == b"1"

    assert mark_finished(r, 6, job_id=job_a) is True
    state = project_state(r, 6)
    job_b = state["job_id"]
    assert state["state"] == "queued" and job_b != job_a and state["followup"] is None
    assert queue.job_ids == [job_a, job_b]
    followup = queue.fetch_job(job_b)
    assert followup.func_name == TRAIN_FUNC and followup.args == ("6",)
    assert followup.meta["reason"] == "followup"

    # The old job finishing again (or late) is not the current one: nothing more is enqueued.
    assert mark_finished(r, 6, job_id=job_a) is False
    assert queue.job_ids == [job_a, job_b]
    # The follow-up runs and finishes with nothing new: the project goes idle, nothing else queued.
    assert mark_started(r, 6, job_id=job_b) == 45
    assert mark_finished(r, 6, job_id=job_b) is False
    assert project_state(r, 6)["state"] == "idle"
    assert queue.job_ids == [job_a, job_b]


def test_skipped_tasks_and_other_events_do_not_count(backend, r):
    def status(body):
        resp = post(backend, body)
        assert resp.status_code == 200, resp.text
        return resp.json()

    assert status(annotation_created(7, cancelled=True))["status"] == "skipped"
    many = {
        "action": "ANNOTATIONS_CREATED",
        "annotation": [
            {"id": 1, "project": 7, "was_cancelled": False},
            {"id": 2, "project": 7, "was_cancelled": True},
            {"id": 3, "project": 7, "was_cancelled": False},
        ],
        "task": [{"id": 1, "project": 7}, {"id": 2, "project": 7}, {"id": 3, "project": 7}],
        "project": {"id": 7},
    }
    assert status(many)["new_annotations"] == 2
    updated = annotation_created(7)
    updated["action"] = "ANNOTATION_UPDATED"
    assert status(updated)["new_annotations"] == 3
    # The plural event without the annotations themselves counts as one.
    assert status({"action": "ANNOTATIONS_CREATED", "project": {"id": 7}})["new_annotations"] == 4
    for action in (
        "TASKS_CREATED",
        "PROJECT_UPDATED",
        "TASKS_DELETED",
        "LABEL_LINK_CREATED",
        "SOMETHING_NEW",
    ):
        answer = status({"action": action, "project": {"id": 7}, "tasks": [{"id": 1}]})
        assert answer["status"] == "ignored", action
    assert int(r.get(keys(7).new_annotations)) == 4

    deleted = status(
        {"action": "ANNOTATIONS_DELETED", "annotations": [{"id": 1}, {"id": 3}], "project": {"id": 7}}
    )
    assert deleted["status"] == "recorded" and deleted["deleted_annotations"] == 2
    assert int(r.get(keys(7).deleted_annotations)) == 2
    (entry,) = [json.loads(x) for x in r.lrange(keys(7).deleted_log, 0, -1)]
    assert entry["ids"] == [1, 3] and entry["count"] == 2
    assert int(r.get(keys(7).new_annotations)) == 4  # deletions are recorded apart
    assert training_queue_of(r).count == 0


def test_start_training_enqueues_at_once_and_coalesces_with_the_queued_job(backend, r):
    start = {"action": "START_TRAINING", "project": {"id": 8, "title": "p"}}
    first = post(backend, start).json()
    assert first["status"] == "enqueued"
    queue = training_queue_of(r)
    assert queue.job_ids == [first["job_id"]]
    job = queue.fetch_job(first["job_id"])
    assert job.args == ("8",) and job.kwargs == {"force": True}  # a person asked
    second = post(backend, start).json()
    assert second["status"] == "coalesced" and second["job_id"] == first["job_id"]
    # Annotations reaching the threshold fold into the queued job too.
    answers = [post(backend, annotation_created(8, task=i)).json() for i in range(THRESHOLD)]
    assert answers[-1]["status"] == "coalesced"
    assert queue.job_ids == [first["job_id"]]


def test_paused_projects_count_but_only_start_training_overrides(backend, r):
    pause(r, 9, "labels being revised")
    answers = [post(backend, annotation_created(9, task=i)).json() for i in range(THRESHOLD + 3)]
    assert answers[-1]["status"] == "paused" and answers[-1]["paused"] == "labels being revised"
    assert answers[-1]["new_annotations"] == THRESHOLD + 3
    assert training_queue_of(r).count == 0
    started = post(backend, {"action": "START_TRAINING", "project": {"id": 9}}).json()
    assert started["status"] == "enqueued"
    assert training_queue_of(r).fetch_job(started["job_id"]).kwargs == {"force": True}


def test_sequential_webhooks_enqueue_once_at_the_threshold(backend, r):
    # Speed is a benchmark's business (bench/), not a test's: here only what the webhooks did.
    for i in range(40):
        resp = post(backend, annotation_created(10, task=i))
        assert resp.status_code == 200
    assert training_queue_of(r).count == 1


@pytest.mark.parametrize(
    ("data", "content_type", "message"),
    [
        ("{", "application/json", "must be JSON"),
        ("action=ANNOTATION_CREATED", "application/x-www-form-urlencoded", "must be JSON"),
        ("[1, 2]", "application/json", "invalid request"),
        ('{"project": {"id": 5}}', "application/json", "action"),
        ('{"action": ""}', "application/json", "action"),
        ('{"action": "ANNOTATION_CREATED", "annotation": {"id": 1}}', "application/json", "project id"),
        ('{"action": "START_TRAINING", "project": {"id": "abc"}}', "application/json", "project.id"),
        (
            '{"action": "ANNOTATION_CREATED", "project": {"id": 5}, "annotation": "x"}',
            "application/json",
            "annotation",
        ),
        (
            '{"action": "ANNOTATIONS_CREATED", "project": 5, "annotation": [1, 2]}',
            "application/json",
            "annotation",
        ),
        (
            '{"action": "ANNOTATION_CREATED", "project": 5, "annotation": {"was_cancelled": "yes"}}',
            "application/json",
            "was_cancelled",
        ),
        (
            '{"action": "ANNOTATIONS_DELETED", "project": 5, "annotations": 3}',
            "application/json",
            "annotations",
        ),
    ],
)
def test_malformed_webhooks_get_400(backend, r, data, content_type, message):
    resp = requests.post(
        backend.url + "/webhook", data=data, headers={"Content-Type": content_type}, timeout=5
    )
    assert resp.status_code == 400, resp.text
    assert message in resp.json()["error"]
    assert r.dbsize() == 0  # nothing was counted


# --- Redis down --------------------------------------------------------------------------------------


@contextlib.contextmanager
def own_redis(tmp_path: Path, port: int):
    proc, _ = start_redis(tmp_path, port)
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait(10)


def test_redis_down_webhook_answers_503_and_predict_keeps_serving(tmp_path, starter_weights, image_server):
    port = free_port()
    model_dir = tmp_path / "models"
    publish(model_dir, starter_weights("detect"), "det-v1")
    scenes = image_server.write_scenes(2, seed=77)
    tasks = [{"id": i, "data": {"image": f"{image_server.url}/{s.name}"}} for i, s in enumerate(scenes)]
    with own_redis(tmp_path, port) as redis_proc:
        b = start_backend(tmp_path, {"MODEL_DIR": str(model_dir), "REDIS_URL": f"redis://127.0.0.1:{port}/0"})
        try:
            assert post(b, annotation_created(5)).json()["status"] == "counted"
            redis_proc.kill()
            redis_proc.wait(10)
            resp = post(b, annotation_created(5))
            assert resp.status_code == 503
            assert "redis is unavailable" in resp.json()["error"]
            assert post(b, {"action": "START_TRAINING", "project": {"id": 5}}).status_code == 503
            # Events that need no Redis are still accepted.
            assert post(b, {"action": "TASKS_CREATED", "project": {"id": 5}}).status_code == 200
            body = {"tasks": tasks, "project": "1.1700000000", "label_config": DETECT_CONFIG}
            predicted = requests.post(b.url + "/predict", json=body, timeout=120)
            assert predicted.status_code == 200, predicted.text
            results = predicted.json()["results"]
            assert len(results) == 2 and all(x["model_version"] == "det-v1" for x in results)
            assert requests.get(b.url + "/health", timeout=5).json()["redis"] is False
        finally:
            b.stop()
    log = b.log.read_text()
    assert '"status": "redis unavailable"' in log


# --- The state machine, straight on Redis and rq --------------------------------------------------------


def test_a_job_gone_for_good_does_not_block_the_project(r):
    settings = TrainingSettings(retry_max=0)
    first = request_training(r, 11, settings=settings)
    assert first.status == "enqueued"
    job = Job.fetch(first.job_id, connection=r)
    assert job.retries_left is None  # retries off
    # Still queued: a second request joins it.
    assert request_training(r, 11, settings=settings).status == "coalesced"
    # Canceled (or failed for good, stopped) without mark_finished: the next request starts afresh.
    job.cancel()
    again = request_training(r, 11, settings=settings)
    assert again.status == "enqueued" and again.job_id != first.job_id
    # A job hash not there (yet) is given time: the enqueue that follows the state change may be in flight.
    Job.fetch(again.job_id, connection=r).delete()
    assert request_training(r, 11, settings=settings).status == "coalesced"
    r.set(keys(11).job_since, int(time.time()) - trigger.STALE_AFTER_S - 5)
    assert request_training(r, 11, settings=settings).status == "enqueued"


def test_followups_respect_pause_unless_forced(r):
    settings = TrainingSettings(min_new_annotations=2)
    job = request_training(r, 12, settings=settings).job_id
    mark_started(r, 12, job_id=job)
    assert trigger.count_annotations(r, 12, 2, settings).status == "followup"
    pause(r, 12, "maintenance")
    assert mark_finished(r, 12, job_id=job, settings=settings) is False  # paused: the follow-up is dropped
    assert project_state(r, 12)["state"] == "idle"
    assert project_state(r, 12)["new_annotations"] == 2  # still counted for later
    # A forced request during a run is kept even though the project is paused.
    job = request_training(r, 12, force=True, settings=settings).job_id
    mark_started(r, 12, job_id=job)
    assert request_training(r, 12, force=True, settings=settings).status == "followup"
    assert r.get(keys(12).followup) == b"force"
    assert mark_finished(r, 12, job_id=job, settings=settings) is True
    followup = Job.fetch(project_state(r, 12)["job_id"], connection=r)
    assert followup.kwargs == {"force": True}
    assert trigger.resume(r, 12) is True and trigger.is_paused(r, 12) is None


def test_retry_policy_and_ttls_come_from_the_config(r):
    settings = TrainingSettings(
        job_timeout_s=900, result_ttl_s=60, failure_ttl_s=120, retry_intervals_s=(5, 50)
    )
    job = Job.fetch(request_training(r, 13, settings=settings).job_id, connection=r)
    assert (job.timeout, job.result_ttl, job.failure_ttl) == (900, 60, 120)
    assert job.retries_left == 3 and job.retry_intervals == [5, 50]


# --- The CLI: `annoloop train` and a real `annoloop worker` ------------------------------------------------


def test_cli_train_enqueues_and_coalesces(r, db_url, config_file):
    env = {"REDIS_URL": db_url, "ANNOLOOP_CONFIG": str(config_file)}
    first = cli("train", "--project", "5", env=env)
    assert first.returncode == 0, first.stderr
    queue = training_queue_of(r)
    (job_id,) = queue.job_ids
    assert job_id in first.stdout
    job = queue.fetch_job(job_id)
    assert job.func_name == TRAIN_FUNC and job.args == ("5",) and job.kwargs == {"force": False}
    second = cli("train", "--project", "5", env=env)
    assert second.returncode == 0 and "already queued" in second.stdout
    assert queue.job_ids == [job_id]

    pause(r, 6, "data import running")
    refused = cli("train", "--project", "6", env=env)
    assert refused.returncode == 1 and "paused (data import running)" in refused.stderr
    assert queue.job_ids == [job_id]
    forced = cli("train", "--project", "6", "--force", env=env)
    assert forced.returncode == 0, forced.stderr
    assert len(queue.job_ids) == 2
    assert queue.fetch_job(queue.job_ids[1]).kwargs == {"force": True}

    bad = cli("train", "--project", "abc", env=env)
    assert bad.returncode == 2 and "project id" in bad.stderr
    down = cli("train", "--project", "5", env={"REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"})
    assert down.returncode == 1 and "Redis" in down.stderr


def _start_train_wait(args: list[str], env: dict[str, str], r: redis.Redis) -> subprocess.Popen:
    full_env = {k: v for k, v in os.environ.items() if k not in ("ANNOLOOP_CONFIG", "REDIS_URL")}
    full_env.update(env)
    proc = subprocess.Popen(
        [str(VENV_BIN / "annoloop"), "train", *args],
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while training_queue_of(r).count == 0:  # the worker below runs in burst mode: the job must be there
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "annoloop train did not enqueue"
        time.sleep(0.05)
    return proc


def test_worker_runs_jobs_and_train_wait_follows_their_progress(r, db_url, tmp_path):
    env = {"REDIS_URL": db_url}
    waiter = _start_train_wait(["--ping", "1.5", "--wait", "--poll", "0.05"], env, r)
    (job_id,) = training_queue_of(r).job_ids
    worker = cli("worker", "--burst", env=env)
    assert worker.returncode == 0, worker.stderr
    out, err = waiter.communicate(timeout=60)
    assert waiter.returncode == 0, err

    job = Job.fetch(job_id, connection=r)
    assert job.func_name == PING_FUNC and job.get_status() == JobStatus.FINISHED
    result = job.return_value()
    assert result["pong"] is True and result["steps"] == 3
    assert result["pid"] != waiter.pid and result["cuda"] is not None  # ran in the worker, torch loaded
    events = [json.loads(line) for line in worker.stderr.splitlines() if line.startswith("{")]
    (start,) = [e for e in events if e["event"] == "worker starting"]
    assert start["queue"] == "training" and start["device"].split(" ")[0] in ("cpu", "cuda")

    lines = out.splitlines()
    assert f"job {job_id}: queued" in lines
    progress = [line for line in lines if "(ping)" in line]
    # One line per change, in order, ending with the job's last progress and its result.
    assert progress == sorted(set(progress), key=progress.index)
    assert len(progress) >= 2, out
    assert progress[-1] == f"job {job_id}: finished: epoch 3/3 (ping)"
    assert lines[-1].startswith(f"job {job_id} result: ")
    assert json.loads(lines[-1].split("result: ", 1)[1])["pong"] is True


def test_train_wait_reports_a_failed_job_and_exits_non_zero(r, db_url):
    env = {"REDIS_URL": db_url}
    waiter = _start_train_wait(["--ping=-1", "--wait", "--poll", "0.05"], env, r)
    worker = cli("worker", "--burst", env=env)
    assert worker.returncode == 0, worker.stderr
    out, err = waiter.communicate(timeout=60)
    assert waiter.returncode == 1
    assert "failed: ValueError: ping: seconds must be >= 0 (got -1)" in err
    assert ": failed" in out


# --- With a real Label Studio: the webhooks it sends for annotators' actions ------------------------------


def _wait_for(predicate, what: str, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _webhook_events(log: Path) -> list[dict]:
    events = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    return [e for e in events if e.get("event") == "webhook"]


@pytest.mark.labelstudio
def test_label_studio_webhooks_count_and_start_training(label_studio, tmp_path, r, db_url):
    ls = label_studio
    config = tmp_path / "annoloop.yaml"
    config.write_text("training:\n  min_new_annotations: 2\n")
    b = start_backend(
        tmp_path, {"MODEL_DIR": str(tmp_path / "models"), "REDIS_URL": db_url, "ANNOLOOP_CONFIG": str(config)}
    )
    try:
        project = ls.create_project("annoloop triggers", DETECT_CONFIG)
        t1, t2, _ = ls.import_tasks(project, [{"image": f"http://127.0.0.1:9/{i}.png"} for i in range(3)])
        ml_id = ls.connect_ml_backend(project, b.url, title="annoloop")
        k = keys(project)

        def created(task: int, cancelled: bool) -> int:
            body = {"result": [], "was_cancelled": cancelled}
            return ls.api("POST", f"/api/tasks/{task}/annotations/", expected=(201,), json=body).json()["id"]

        ann = created(t1, cancelled=False)
        _wait_for(lambda: r.get(k.new_annotations) == b"1", "the first annotation to be counted")
        created(t2, cancelled=True)  # the annotator skipped the task
        _wait_for(
            lambda: any(e.get("status") == "skipped" for e in _webhook_events(b.log)),
            "the skipped task's webhook",
        )
        assert r.get(k.new_annotations) == b"1"

        ls.api("PATCH", f"/api/annotations/{ann}/", json={"result": [], "lead_time": 5.0})
        _wait_for(lambda: r.get(k.new_annotations) == b"2", "the update to be counted")
        queue = training_queue_of(r)
        (job_id,) = queue.job_ids  # the threshold (2) was reached: one job
        job = queue.fetch_job(job_id)
        assert job.args == (str(project),) and job.kwargs == {"force": False}

        ls.api("DELETE", f"/api/annotations/{ann}/")
        _wait_for(lambda: r.get(k.deleted_annotations) == b"1", "the deletion to be recorded")
        assert json.loads(r.lindex(k.deleted_log, 0))["ids"] == [ann]

        ls.api("POST", f"/api/ml/{ml_id}/train")  # the "Start Training" button
        start = _wait_for(
            lambda: [e for e in _webhook_events(b.log) if e.get("action") == "START_TRAINING"],
            "START_TRAINING",
        )
        assert start[0]["status"] == "coalesced" and start[0]["job_id"] == job_id
        assert queue.job_ids == [job_id]
    finally:
        b.stop()
