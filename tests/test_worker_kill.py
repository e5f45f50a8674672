"""`annoloop worker` killed in the middle of a training, as a crash, an OOM kill or a lost machine would:
SIGKILL to the worker's whole process group and to that of rq's work horse, the child that runs the job (rq
puts it in a group of its own, so that a Ctrl-C meant for the worker does not hit it).

Real parts throughout: Label Studio 1.23.2 with a labeled project, a redis-server of this test's own (the dead
worker's keys stay in it), `annoloop worker` processes and `annoloop train` as a user runs it. Asserted: the
kill leaves no version (not even a temporary folder) and the served model as it was; and the project is not
stuck behind the dead job: once rq's heartbeat of that job has expired, the next request hands it back to rq,
which retries it at once on the new worker, and it trains and publishes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
import yaml
from rq.job import Job

from annoloop.model_store import DEFAULT_PROJECT, REJECTED_DIR, ModelStore
from tests.conftest import gt_result, publish, shapes_project
from training.convergence import history_path, read_history
from training.trigger import project_state

EXE = str(Path(sys.executable).parent / "annoloop")
TINY = {
    "imgsz": 128,
    "batch": 8,
    "workers": 0,
    "holdout_fraction": 0.3,
    "finetune_epochs": 1,
    "min_improvement": -1.0,
    "train_args": {"nbs": 8, "close_mosaic": 1},
}


def start_worker(env: dict[str, str], log: Path) -> subprocess.Popen:
    """`annoloop worker` in a process group of its own, as a service manager would start it."""
    return subprocess.Popen(
        [EXE, "worker"],
        env={**os.environ, **env},
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def processes() -> dict[int, tuple[str, int, int]]:
    """pid -> (state, parent pid, process group) of every process, from /proc."""
    out = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()  # after "pid (comm) ": state ppid pgrp ...
        out[int(stat.parent.name)] = (fields[0], int(fields[1]), int(fields[2]))
    return out


def process_groups(root: int) -> set[int]:
    """The process groups of ``root`` and all its descendants (rq's work horse has one of its own)."""
    procs = processes()
    tree, changed = {root}, True
    while changed:
        changed = False
        for pid, (_, ppid, _) in procs.items():
            if ppid in tree and pid not in tree:
                tree.add(pid)
                changed = True
    return {procs[pid][2] for pid in tree if pid in procs}


def alive_in(groups: set[int]) -> list[int]:
    """Processes of ``groups`` that are still alive (zombies waiting for a parent do not count)."""
    return [pid for pid, (state, _, pgrp) in processes().items() if pgrp in groups and state != "Z"]


def annoloop(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [EXE, *args], env={**os.environ, **env}, capture_output=True, text=True, timeout=120
    )


def wait_for(what: str, check, timeout: float, logs: list[Path], poll: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(poll)
    tails = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in logs if p.exists())
    raise AssertionError(f"timed out waiting for {what}\n{tails}")


@pytest.mark.labelstudio
def test_worker_killed_mid_training_leaves_the_served_model_and_the_next_request_trains(
    label_studio, tmp_path, starter_weights, private_redis
):
    ls = label_studio
    redis_url = private_redis
    conn = redis.Redis.from_url(redis_url)
    model_dir = tmp_path / "models"
    publish(model_dir, starter_weights("detect"), "starter")  # the default model, served to the project
    store = ModelStore(model_dir)
    default_pointer = store.pointer(DEFAULT_PROJECT)
    served_before = (default_pointer.read_text(), default_pointer.stat().st_mtime_ns)

    project_id, ids, shapes = shapes_project(ls, "worker-kill", 12, seed=23, title="annoloop worker kill")
    project = str(project_id)
    for task_id, s in zip(ids, shapes, strict=True):
        ls.api(
            "POST",
            f"/api/tasks/{task_id}/annotations/",
            expected=(201,),
            json={"result": gt_result(s), "was_cancelled": False},
        )

    def env_with(name: str, **training) -> dict[str, str]:
        config = tmp_path / f"{name}.yaml"
        config.write_text(yaml.safe_dump({"log_level": "INFO", "training": {**TINY, **training}}))
        return {
            "MODEL_DIR": str(model_dir),
            "REDIS_URL": redis_url,
            "LABEL_STUDIO_URL": ls.url,
            "LABEL_STUDIO_API_KEY": ls.token,
            "ANNOLOOP_CONFIG": str(config),
        }

    long_env = env_with("long", base_epochs=500)  # far from done when it is killed
    short_env = env_with("short", base_epochs=2)  # what the next worker trains with
    logs = [tmp_path / "worker-1.log", tmp_path / "worker-2.log"]
    workers: list[subprocess.Popen] = []
    project_dir = model_dir / project
    try:
        workers.append(start_worker(long_env, logs[0]))
        out = annoloop("train", "--project", project, env=long_env)
        assert out.returncode == 0 and "enqueued" in out.stdout, out.stdout + out.stderr
        job = Job.fetch(project_state(conn, project)["job_id"], connection=conn)

        # 1. The job is in its training stage, an epoch done: kill the worker and everything it started.
        def training() -> bool:
            assert workers[0].poll() is None, logs[0].read_text()[-3000:]
            progress = job.get_meta(refresh=True).get("progress") or {}
            return progress.get("stage") == "train" and (progress.get("epoch") or 0) >= 1

        wait_for("the job's training stage", training, 300, logs)
        groups = process_groups(workers[0].pid)
        assert len(groups) >= 2, groups  # the worker's (with rq's scheduler) and the work horse's
        for group in groups:
            os.killpg(group, signal.SIGKILL)
        workers[0].wait(30)
        wait_for("every process of the worker to die", lambda: not alive_in(groups), 30, logs)

        # Nothing half-written: no version folder (not even a temporary one), no rejected card, no history
        # row; the pointer the project is served through is as it was.
        assert sorted(p.name for p in project_dir.iterdir()) == [".cache", ".train.lock", ".work"]
        assert list((project_dir / ".work").glob("run-*"))  # the killed run's work, left behind
        assert (
            not (project_dir / REJECTED_DIR).exists() and read_history(history_path(model_dir, project)) == []
        )
        assert store.current(project) is None and not store.pointer(project).exists()
        assert (default_pointer.read_text(), default_pointer.stat().st_mtime_ns) == served_before
        assert store.served(project).version == "starter"
        # rq still calls the job started, and the trigger still has it running.
        assert job.get_status(refresh=True) == "started"
        assert project_state(conn, project)["state"] == "running"

        # 2. A new worker, and new requests (`annoloop train`, as a user or the annotators' webhooks make them).
        workers.append(start_worker(short_env, logs[1]))
        out = annoloop("train", "--project", project, env=short_env)
        assert out.returncode == 0, out.stdout + out.stderr
        # The dead job's heartbeat has not expired yet: the request joins it as a follow-up ...
        assert f"training job {job.id} is running" in out.stdout

        def handed_back() -> bool:
            # ... and once it has expired (at most 90 s after the worker's last beat), a request hands the job
            # back to rq, which puts it on the queue again at once.
            assert workers[1].poll() is None, logs[1].read_text()[-3000:]
            if job.get_status(refresh=True) != "started" or job.get_meta(refresh=True).get("attempts") != 1:
                return True
            again = annoloop("train", "--project", project, env=short_env)
            assert again.returncode == 0, again.stdout + again.stderr
            return False

        wait_for("the dead job to be handed back to rq", handed_back, 300, logs, poll=5)

        # 3. The same job, retried on the new worker, trains and publishes.
        wait_for("a published version", lambda: store.current(project), 300, logs)
        wait_for("the job to finish", lambda: job.get_status(refresh=True) == "finished", 120, logs)
        promoted = store.current(project)
        assert promoted.version.startswith("v001-")  # the killed run took no version number
        card = promoted.metadata()
        assert sorted(card["task_ids"]["train"] + card["task_ids"]["holdout"]) == sorted(ids)
        assert card["training"]["plan"]["epochs"] == 2  # trained by the new worker's settings
        assert job.get_meta(refresh=True)["attempts"] == 2
        (row,) = read_history(history_path(model_dir, project))
        assert (row.version, row.promoted) == (promoted.version, True)
        assert not list((project_dir / ".work").iterdir())  # the crash's left-overs are gone
        wait_for("the project to be idle", lambda: project_state(conn, project)["state"] == "idle", 120, logs)
        assert (default_pointer.read_text(), default_pointer.stat().st_mtime_ns) == served_before
    finally:
        for w in workers:
            if w.poll() is None:
                os.killpg(w.pid, signal.SIGTERM)
                try:
                    w.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(w.pid, signal.SIGKILL)
                    w.wait(30)


def test_a_webhook_hands_an_abandoned_job_back_to_rq_at_once(private_redis):
    """The same recovery, fast and from a server thread (where webhooks run): rq's own bookkeeping of a job
    a worker started, the worker gone, its heartbeat's expiry brought forward in Redis instead of waited for."""
    import threading

    from rq import Worker
    from rq.registry import ScheduledJobRegistry, StartedJobRegistry

    from config.settings import TrainingSettings
    from training.queue import training_queue
    from training.trigger import count_annotations, mark_started, request_training

    r = redis.Redis.from_url(private_redis)
    settings = TrainingSettings(min_new_annotations=1)  # retries after 10, 60, 300 s
    job = Job.fetch(request_training(r, "7", settings=settings).job_id, connection=r)
    queue = training_queue(r, settings)
    # A worker takes the job and starts it, exactly as rq does, and then dies without a trace.
    worker = Worker([queue], connection=r)
    worker.register_birth()
    queue.remove(job.id)
    worker.prepare_execution(job)
    worker.prepare_job_execution(job)
    mark_started(r, "7", job.id)
    started = StartedJobRegistry(queue.name, connection=r)
    assert job.get_status(refresh=True) == "started" and job.id in started.get_job_ids(cleanup=False)

    def webhook() -> str:
        out: list[str] = []
        t = threading.Thread(target=lambda: out.append(count_annotations(r, "7", 1, settings).status))
        t.start()
        t.join(30)
        return out[0]

    # While its heartbeat lasts, the job counts as running: the request is owed a follow-up.
    assert webhook() == "followup" and job.get_status(refresh=True) == "started"
    # Its heartbeat expires (here: brought forward to the past) ...
    members = r.zrange(started.key, 0, -1)
    r.zadd(started.key, dict.fromkeys(members, 1), xx=True)
    # ... and the next webhook hands it to rq, whose retry puts it back on the queue at once (no scheduler
    # needed: the one of the dead worker may have died with it).
    assert webhook() == "followup"
    assert job.get_status(refresh=True) == "queued" and job.id in queue.get_job_ids()
    assert ScheduledJobRegistry(queue.name, connection=r).get_job_ids() == []
    job.refresh()
    assert job.retries_left == 2 and job.retry_intervals == [0, 60, 300]  # it counts; later ones wait
    assert project_state(r, "7")["state"] == "running"  # until the retried job starts and finishes
