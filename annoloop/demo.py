"""`annoloop demo` (what `make demo` runs): the whole loop on one machine, then left running for a person.

It starts, on loopback only: Redis (the one at REDIS_URL if it answers, else its own `redis-server`), a real
Label Studio 1.23.2 (its own virtual environment, a fresh data folder), the backend, one worker and the
scheduled sync, each in its own process group; creates a project from the built-in image set or a VOC / YOLO /
COCO folder, connects the backend, syncs, and then plays an annotator for a few rounds: it takes the next task
the way Label Studio serves it, submits the ground-truth boxes through the API, and lets webhooks, retraining,
hot-swap and re-sync happen on their own. Ctrl-C stops exactly the processes it started.

The :class:`Stack` and :class:`Annotator` parts are also what the end-to-end test drives step by step.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
LS_VENV = REPO / ".ls-venv"
CACHE = Path(os.environ.get("ANNOLOOP_CACHE", Path.home() / ".cache" / "annoloop"))


class DemoError(RuntimeError):
    """The demo cannot go on; the message says what to do."""


def free_port(preferred: int | None = None) -> int:
    if preferred:
        with socket.socket() as s, contextlib.suppress(OSError):
            s.bind(("127.0.0.1", preferred))
            return preferred
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check: Callable[[], Any], timeout: float, what: str, poll: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            got = check()
            if got:
                return got
        time.sleep(poll)
    raise DemoError(f"timed out after {timeout:.0f} s waiting for {what}")


@dataclass
class Stack:
    """The processes of one demo run; ``stop()`` ends them (and only them)."""

    workdir: Path
    procs: list[tuple[str, subprocess.Popen]] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    ls: Any = None  # annoloop.labelstudio_server.LabelStudioServer
    backend_url: str = ""
    redis_url: str = ""

    @property
    def logs(self) -> Path:
        return self.workdir / "logs"

    def spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        self.logs.mkdir(parents=True, exist_ok=True)
        log = (self.logs / f"{name}.log").open("ab")
        proc = subprocess.Popen(
            args,
            env={**os.environ, **self.env, **(env or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=self.workdir,
            start_new_session=True,  # its own group: Ctrl-C here is handled by us, stop() ends the group
        )
        self.procs.append((name, proc))
        return proc

    def check_alive(self) -> None:
        for name, proc in self.procs:
            if proc.poll() is not None:
                raise DemoError(f"{name} exited with {proc.returncode}; see {self.logs / (name + '.log')}")

    def stop(self) -> None:
        for _name, proc in reversed(self.procs):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for _name, proc in reversed(self.procs):
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        self.procs.clear()
        if self.ls is not None:
            self.ls.stop()
            self.ls = None


def redis_server_command(exe: str, port: int, data_dir: Path) -> list[str]:
    """A private, throw-away redis-server on loopback (nothing saved): the demo's and the tests'."""
    return [
        exe,
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(data_dir),
    ]


def start_redis(stack: Stack, url: str | None) -> str:
    """The Redis at ``url`` (REDIS_URL, when set and answering), else a private redis-server.

    Only an explicitly named Redis is shared: the demo's fresh Label Studio numbers projects from 1, and
    counters, pause flags or workers of another run on a default Redis would act on them.
    """
    import redis

    if url:
        with contextlib.suppress(redis.RedisError, ValueError):
            if redis.Redis.from_url(url, socket_connect_timeout=1).ping():
                return url
    exe = shutil.which("redis-server")
    if exe is None:
        raise DemoError(
            f"no Redis answers at {url} and redis-server is not installed (apt install redis-server)"
        )
    port = free_port()
    data = stack.workdir / "redis"
    data.mkdir(parents=True, exist_ok=True)
    stack.spawn("redis", redis_server_command(exe, port, data))
    own = f"redis://127.0.0.1:{port}/0"
    wait_until(lambda: redis.Redis.from_url(own).ping(), 20, "redis-server")
    return own


def start_label_studio(stack: Stack, port: int | None, files_root: Path | None) -> Any:
    from annoloop.labelstudio_server import label_studio_version, launch_label_studio

    if not (LS_VENV / "bin" / "label-studio").exists():
        raise DemoError(f"Label Studio is not installed in {LS_VENV}: run `make install`")
    template = CACHE / "labelstudio" / f"label-studio-{label_studio_version(LS_VENV)}-migrated.sqlite3"
    template.parent.mkdir(parents=True, exist_ok=True)
    stack.ls = launch_label_studio(
        LS_VENV,
        stack.workdir / "label-studio",
        free_port(port),
        db_template=template,
        files_root=files_root,
    )
    return stack.ls


@dataclass
class Round:
    labels: int
    version: str | None
    heldout_map50: float | None
    heldout_map50_95: float | None
    promoted: bool | None
    queue_version: str | None
    seconds: float
    holdout_tasks: int | None = None


class Annotator:
    """Plays a person in Label Studio: the next task as Label Studio serves it, the true boxes submitted."""

    def __init__(self, ls: Any, project: int, ground_truth: dict[str, Any]):
        self.ls = ls
        self.project = project
        self.truth = ground_truth
        self.labeled: list[int] = []

    def next_task(self) -> int | None:
        r = self.ls.api("GET", f"/api/projects/{self.project}/next", expected=(200, 404))
        return int(r.json()["id"]) if r.status_code == 200 and r.json().get("id") else None

    def label(self, task_id: int) -> None:
        result = self.truth[str(task_id)]["result"]
        self.ls.api("POST", f"/api/tasks/{task_id}/annotations", json={"result": result, "lead_time": 5.0})
        self.labeled.append(task_id)


def _history(model_dir: Path, project: int) -> list[Any]:
    from training.convergence import history_path, read_history

    return read_history(history_path(model_dir, str(project)))


def play_round(
    stack: Stack,
    annotator: Annotator,
    model_dir: Path,
    per_round: int,
    timeout: float,
    say: Callable[[str], None],
) -> Round:
    """Label ``per_round`` tasks, then wait for the training they trigger and for the re-sync it causes."""
    started = time.monotonic()
    trained_before = len(_history(model_dir, annotator.project))
    for _ in range(per_round):
        task = annotator.next_task()
        if task is None:
            say("  no task left to label")
            break
        annotator.label(task)
    import redis

    from training.trigger import is_paused

    paused = is_paused(redis.Redis.from_url(stack.redis_url), annotator.project)
    if paused:
        say(f"  automatic retraining is paused ({paused}): `annoloop train --force` would still train")
        return Round(
            len(annotator.labeled), None, None, None, None, None, round(time.monotonic() - started, 1)
        )
    say(f"  labeled {len(annotator.labeled)} tasks; waiting for the retraining the webhook starts ...")

    def trained() -> list[Any] | None:
        stack.check_alive()
        rows = _history(model_dir, annotator.project)
        return rows if len(rows) > trained_before else None

    rows = wait_until(trained, timeout, "the retraining (see logs/worker.log)", poll=2.0)
    row = rows[-1]
    queue_version = None
    if row.promoted:
        say(
            f"  {row.version} promoted (held-out mAP50 {row.heldout_map50:.3f}, mAP50-95 "
            f"{row.heldout_map50_95:.3f}); waiting for the re-sync ..."
        )

        def resynced() -> str | None:
            v = stack.ls.project(annotator.project).get("model_version") or ""
            return v if v.startswith(row.version + "@") else None

        queue_version = wait_until(
            resynced, timeout, "the sync after promotion (see logs/worker.log)", poll=2.0
        )
    return Round(
        len(annotator.labeled),
        row.version,
        row.heldout_map50,
        row.heldout_map50_95,
        row.promoted,
        queue_version,
        round(time.monotonic() - started, 1),
        row.holdout_tasks,
    )


def run_demo(args: Any) -> int:
    from annoloop.datasets import read_dataset
    from annoloop.demo_data import write_demo_dataset
    from annoloop.demo_eval import TestScore, score_model, write_curve
    from annoloop.labelstudio import LabelStudioAccess
    from annoloop.model_store import DEFAULT_PROJECT, ModelStore
    from annoloop.project_setup import connect_backend, import_dataset
    from config.settings import load_settings
    from sync.job import sync_project

    def say(text: str) -> None:
        print(text, flush=True)

    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    workdir = Path(args.workdir).resolve() / stamp
    workdir.mkdir(parents=True)
    stack = Stack(workdir)
    model_dir = workdir / "models"
    try:
        if args.data:
            data_root = Path(args.data).resolve()
            files_root = data_root.parent  # served in place: nothing is copied
            fmt = args.format
        else:
            files_root = workdir / "files"
            data_root = write_demo_dataset(files_root / "demo-shapes", n=args.images, seed=args.seed)
            fmt = "voc"
        dataset = read_dataset(fmt, data_root)
        groups: dict[str, Callable[[Any], bool]] = {}
        if args.data:
            test_images = [im for im in dataset.images if im.split == "test"]  # not imported (below)
        else:
            test_root = write_demo_dataset(
                workdir / "test-set" / "demo-shapes", n=args.test_images, seed=args.seed + 1000
            )
            test_images = read_dataset("voc", test_root).images
            groups = {
                "day": lambda im: "night" not in im.path.name,
                "night": lambda im: "night" in im.path.name,
            }
        say(f"annoloop demo in {workdir}")
        say(f"data: {fmt} {data_root}: {len(dataset.images)} images, labels {', '.join(dataset.labels)}")

        stack.redis_url = start_redis(stack, os.environ.get("REDIS_URL"))
        say(f"redis: {stack.redis_url}")
        say("starting Label Studio 1.23.2 ...")
        ls = start_label_studio(stack, args.ls_port, files_root)
        say(f"Label Studio: {ls.url} (up in {ls.startup_seconds:.0f} s)")

        config = workdir / "annoloop.yaml"
        training = {
            "min_new_annotations": args.per_round,
            "imgsz": args.imgsz or (320 if args.data else 160),
            "base_epochs": args.base_epochs,
            "finetune_epochs": args.finetune_epochs,
            "batch": 8,
            "workers": 0,
        }
        config.write_text(
            yaml.safe_dump(
                {
                    "log_level": "WARNING",
                    "training": training,
                    "sync": {"ranking": {"batch_size": args.per_round}},
                }
            )
        )
        stack.env = {
            "LABEL_STUDIO_URL": ls.url,
            "LABEL_STUDIO_API_KEY": ls.token,
            "REDIS_URL": stack.redis_url,
            "MODEL_DIR": str(model_dir),
            "ANNOLOOP_CONFIG": str(config),
            "YOLO_OFFLINE": "1",
        }
        os.environ.update(
            stack.env
        )  # the in-process parts (import, connect, first sync) use the same settings
        settings = load_settings()
        exe = str(Path(sys.executable).parent / "annoloop")
        if not args.cold_start:
            # For a dataset of its own classes the starter gives no usable pre-labels, but the first model
            # trains from its weights (a base run), which learns far more from 20 labels than a model from
            # scratch (the label-efficiency bench's BCCD runs start the same way).
            say("default model: the generated-shapes starter model (trained once, cached) ...")
            subprocess.run([exe, "starter-model"], env={**os.environ}, check=True, stdout=subprocess.DEVNULL)
        port = free_port(args.backend_port)
        stack.backend_url = f"http://127.0.0.1:{port}"
        stack.spawn("backend", [exe, "serve", "--host", "127.0.0.1", "--port", str(port)])
        wait_until(lambda: _healthy(stack.backend_url), 120, "the backend (see logs/backend.log)")
        stack.spawn("worker", [exe, "worker"])
        say(f"backend: {stack.backend_url}; worker started")

        access = LabelStudioAccess(settings.label_studio, timeout_s=120)
        report = import_dataset(
            access,
            dataset,
            project=None,
            create_title=args.title,
            storage="local-files",
            document_root=files_root,
            ground_truth_dir=workdir / "ground-truth",
            splits=None if not args.data else {"train", "val"} if _has_splits(dataset) else None,
        )
        project = report.project
        say("\n".join(report.lines()))
        say("\n".join(connect_backend(access, project, stack.backend_url).lines()))
        summary = sync_project(project, settings, top=5)
        say("\n".join(summary.lines()))
        stack.spawn("sync", [exe, "sync", "--project", str(project), "--every", args.sync_every, "--quiet"])

        truth = json.loads((workdir / "ground-truth" / "ground_truth.json").read_text())
        annotator = Annotator(ls, project, truth)
        store = ModelStore(model_dir)
        curve: list[TestScore] = []

        def score_served(labels: int) -> None:
            """Score the model the backend serves now on the fixed test set (once per version)."""
            served = store.current(str(project)) or store.current(DEFAULT_PROJECT)
            if served is None or not test_images:
                return
            if curve and curve[-1].version == served.version:
                last = curve[-1]
                curve.append(TestScore(last.version, labels, last.map50, last.map50_95))
            else:
                scored = score_model(
                    served.weights,
                    served.version,
                    labels,
                    test_images,
                    groups,
                    imgsz=int(training["imgsz"]),
                    workdir=workdir / "test-scores",
                )
                curve.append(scored)
            say(f"  served {served.version}: {curve[-1].line()} on {len(test_images)} images nobody labels")

        score_served(0)
        for r in range(1, args.rounds + 1):
            say(f"round {r}/{args.rounds}: labeling {args.per_round} tasks in queue order")
            got = play_round(stack, annotator, model_dir, args.per_round, args.round_timeout, say)
            mAP = "-" if got.heldout_map50 is None else f"{got.heldout_map50:.3f}"
            mAP95 = "-" if got.heldout_map50_95 is None else f"{got.heldout_map50_95:.3f}"
            say(
                f"round {r}: {got.labels} labels, model {got.version} "
                f"({'promoted' if got.promoted else 'not promoted'}), held-out mAP50 {mAP}, mAP50-95 {mAP95}"
                f"{'' if got.holdout_tasks is None else f' ({got.holdout_tasks} held-out tasks)'}, "
                f"queue ordered by {got.queue_version or 'the previous version'} ({got.seconds:.0f} s)"
            )
            score_served(got.labels)
        from training.report import write_report

        png, table = write_report(_history(model_dir, project), workdir / "report", str(project))
        say(f"training history: {png}\n{Path(table).read_text()}")
        if curve:
            cpng, cmd = write_curve(curve, workdir / "report", f"annoloop demo: project {project}")
            say(f"learning curve on the fixed test set: {cpng}\n{cmd.read_text()}")
        say(
            "\nEverything keeps running. Open the project and label on:\n"
            f"  {ls.url}/projects/{project}/data   login {ls.username} / {ls.password}\n"
            f"  logs: {stack.logs}\nCtrl-C stops every process this demo started."
        )
        if args.keep:
            while True:
                stack.check_alive()
                time.sleep(2)
        return 0
    except KeyboardInterrupt:
        say("\nstopping ...")
        return 0
    except DemoError as e:
        say(f"annoloop demo: {e}")
        return 1
    finally:
        stack.stop()
        say("stopped every process the demo started")


def _healthy(url: str) -> bool:
    import requests

    return requests.get(url + "/health", timeout=2).status_code == 200


def _has_splits(dataset: Any) -> bool:
    return any(im.split for im in dataset.images)
