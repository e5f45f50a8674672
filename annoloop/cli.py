"""The ``annoloop`` command line: one subcommand per admin task, each a thin layer over a module."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from config.settings import ConfigError, Settings, load_settings

log = logging.getLogger(__name__)


def _settings() -> Settings:
    try:
        return load_settings()
    except ConfigError as e:
        print(f"annoloop: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def cmd_serve(args: argparse.Namespace) -> int:
    from annoloop.logs import configure_logging
    from ml_backend.serve import serve

    settings = _settings()
    configure_logging(settings.log_level)
    serve(settings, args.host or settings.server.host, args.port or settings.server.port)
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    settings = _settings()
    print(json.dumps(settings.model_dump(mode="json"), indent=2))  # SecretStr dumps as '**********'
    return 0


def cmd_starter_model(args: argparse.Namespace) -> int:
    """Train the small generated-shapes model (cached) and publish it as the default model."""
    os.environ.setdefault("YOLO_OFFLINE", "1")
    from annoloop.model_store import DEFAULT_PROJECT, ModelStore
    from training.bootstrap import DEMO_RECIPE, cached_starter_model

    settings = _settings()
    store = ModelStore(settings.model_dir)
    recipe = dict(DEMO_RECIPE)
    task = recipe.pop("task", "detect")
    print(
        f"starter model: {task} on generated shapes {recipe} (trained once, then cached in {args.cache_dir})"
    )
    weights = cached_starter_model(task, Path(args.cache_dir), **recipe)
    version = "starter-" + weights.stem.rsplit("-", 1)[-1][:8]
    current = store.current(DEFAULT_PROJECT)
    if current is not None and current.version == version:
        print(f"default model {version} is already served from {current.path}")
        return 0
    if store.version(DEFAULT_PROJECT, version).weights.is_file():
        mv = store.set_current(DEFAULT_PROJECT, version)
    else:
        from training.synthetic import CLASSES

        meta = {"source": "starter", "task": task, "recipe": recipe, "classes": list(CLASSES)}
        mv = store.publish(DEFAULT_PROJECT, version, weights, meta)
    print(f"published {mv.version} as the default model: {mv.weights}")
    return 0


def cmd_sample_images(args: argparse.Namespace) -> int:
    """Write generated scenes (the starter model's world) to import into Label Studio."""
    import numpy as np
    from PIL import Image

    from training.synthetic import render_scene

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    for i in range(args.count):
        rgb, _ = render_scene(rng, 640, 480, max_shapes=4)
        Image.fromarray(rgb).save(out / f"shapes-{i:04d}.jpg", quality=92)
    print(f"wrote {args.count} images to {out}/")
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    """Run an rq worker on the training queue (rq's scheduler included, for delayed retries)."""
    import redis
    from rq import Worker

    from annoloop.logs import configure_logging
    from training.queue import QUEUE_NAME, describe_device, redis_location, training_queue

    settings = _settings()
    configure_logging(settings.log_level)
    conn = redis.Redis.from_url(settings.redis_url)
    try:
        conn.ping()
    except redis.RedisError as e:
        print(
            f"annoloop worker: cannot reach Redis at {redis_location(settings.redis_url)}: {e}",
            file=sys.stderr,
        )
        return 1
    device = describe_device()
    log.info(
        "worker starting",
        extra={
            "queue": QUEUE_NAME,
            "device": device,
            "redis": redis_location(settings.redis_url),
            "burst": args.burst,
        },
    )
    from sync.queue import sync_queue

    # Training first: a sync waits for the training in front of it, never the other way round.
    queues = [training_queue(conn, settings.training), sync_queue(conn)]
    worker = Worker(queues, connection=conn, name=args.name)
    worker.work(burst=args.burst, with_scheduler=True, logging_level=settings.log_level)
    log.info("worker stopped", extra={"queue": QUEUE_NAME, "worker": worker.name})
    return 0


def _describe_outcome(outcome) -> str:
    p = outcome.project
    if outcome.status == "enqueued":
        return f"project {p}: training job {outcome.job_id} enqueued on the training queue"
    if outcome.status == "coalesced":
        return f"project {p}: training job {outcome.job_id} is already queued; this request joins it"
    if outcome.status == "followup":
        return (
            f"project {p}: training job {outcome.job_id} is running; one follow-up training will run after it"
        )
    if outcome.status == "paused":
        return f"project {p} is paused ({outcome.paused}): nothing enqueued; --force trains anyway"
    return f"project {p}: {outcome.status}"


def _watch(conn, job, args: argparse.Namespace, outcome) -> int:
    from rq.exceptions import InvalidJobOperation, NoSuchJobError
    from rq.job import Job, JobStatus

    from training.queue import WaitTimeout, failure_reason, watch_job
    from training.trigger import project_state

    followed = False
    while True:
        try:
            status = watch_job(
                job, lambda line, j=job: print(f"job {j.id}: {line}", flush=True), args.poll, args.timeout
            )
        except WaitTimeout as e:
            print(f"annoloop train: {e}", file=sys.stderr)
            return 1
        except (InvalidJobOperation, NoSuchJobError):
            print(f"annoloop train: job {job.id} is gone (expired or deleted)", file=sys.stderr)
            return 1
        if status != JobStatus.FINISHED:
            print(f"job {job.id} {status.value}: {failure_reason(job)}", file=sys.stderr, flush=True)
            return 1
        result = job.return_value(refresh=True)
        print(f"job {job.id} result: {json.dumps(result, default=str, sort_keys=True)}", flush=True)
        if outcome is not None and outcome.status == "followup" and not followed:
            # This request was owed to a follow-up of the job that was running: wait for that one too.
            state = project_state(conn, outcome.project)
            if state["job_id"] and state["job_id"] != job.id and state["state"] != "idle":
                job = Job.fetch(state["job_id"], connection=conn)
                followed = True
                print(f"project {outcome.project}: waiting for the follow-up job {job.id}", flush=True)
                continue
        return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Ask for a training now (coalescing with a queued or running one), optionally waiting for it."""
    import redis
    from rq.exceptions import NoSuchJobError
    from rq.job import Job

    from training.queue import enqueue_ping, redis_location
    from training.trigger import request_training

    settings = _settings()
    if args.ping is None and args.project is None:
        print("annoloop train: --project is required (or --ping to check the worker)", file=sys.stderr)
        return 2
    conn = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=5)
    try:
        outcome = None
        if args.ping is not None:
            job = enqueue_ping(conn, args.ping, settings.training)
            print(f"ping job {job.id} enqueued on the training queue", flush=True)
        else:
            outcome = request_training(
                conn, args.project, force=args.force, reason="manual", settings=settings.training
            )
            print(
                _describe_outcome(outcome),
                flush=True,
                file=sys.stderr if outcome.status == "paused" else None,
            )
            if outcome.job_id is None:
                return 1
            if not args.wait:
                return 0
            job = Job.fetch(outcome.job_id, connection=conn)
        return _watch(conn, job, args, outcome) if args.wait else 0
    except NoSuchJobError:
        print(
            f"annoloop train: job {outcome.job_id if outcome else ''} is gone (expired or deleted)",
            file=sys.stderr,
        )
        return 1
    except redis.RedisError as e:
        print(f"annoloop train: Redis at {redis_location(settings.redis_url)}: {e}", file=sys.stderr)
        return 1


def _project_id(value: str) -> str:
    if not value.isdigit():
        raise argparse.ArgumentTypeError(f"a Label Studio project id is a number, got {value!r}")
    return str(int(value))


def cmd_models(args: argparse.Namespace) -> int:
    from annoloop.model_commands import format_versions, list_versions
    from annoloop.model_store import ModelStore

    print(format_versions(list_versions(ModelStore(_settings().model_dir), args.project)))
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    from annoloop.model_commands import rollback
    from annoloop.model_store import ModelStore, ModelStoreError

    try:
        previous = rollback(ModelStore(_settings().model_dir), args.project, args.to)
    except ModelStoreError as e:
        print(f"annoloop: {e}", file=sys.stderr)
        return 1
    print(f"project {args.project}: now serving {args.to} (was {previous}); backends follow within a second")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """What is served, whether a training is queued or running, and whether retraining continues (and why)."""
    import redis

    from annoloop.model_store import ModelStore
    from training.convergence import ConvergenceRules, decide, history_path, prelabel_summary, read_history
    from training.trigger import project_state

    settings = _settings()
    served = ModelStore(settings.model_dir).served(args.project)
    print(f"project {args.project}")
    print(f"  served model:  {served.version + ' (' + served.project + ')' if served else 'none'}")
    history = read_history(history_path(settings.model_dir, args.project))
    decision = decide(history, ConvergenceRules(**settings.training.convergence.model_dump()))
    print(f"  trainings:     {len(history)} ({sum(r.promoted for r in history)} promoted)")
    print(f"  retraining:    {'continues' if decision.keep_training else 'stopped'}: {decision.reason}")
    reviewed = next((s for r in reversed(history) if (s := prelabel_summary(r))), "")
    if reviewed:
        print(f"  pre-labels:    {reviewed}")
    try:
        state = project_state(redis.Redis.from_url(settings.redis_url, socket_timeout=2), args.project)
    except redis.RedisError as e:
        print(f"  queue:         unknown (Redis unreachable: {type(e).__name__})")
        return 1
    print(f"  queue:         {state['state']}" + (f" (job {state['job_id']})" if state["job_id"] else ""))
    print(
        f"  new labels:    {state['new_annotations']} since the last training "
        f"(threshold {settings.training.min_new_annotations})"
    )
    if state["paused"]:
        print(f"  paused:        {state['paused']} (annoloop train --force overrides)")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from training.convergence import history_path, read_history
    from training.report import write_report

    settings = _settings()
    rows = read_history(history_path(settings.model_dir, args.project))
    if not rows:
        print(f"annoloop: project {args.project} has no training history yet", file=sys.stderr)
        return 1
    png, md = write_report(rows, Path(args.out), args.project)
    print(md.read_text())
    print(f"wrote {png} and {md}")
    return 0


def _duration(text: str) -> float:
    """``90``, ``30s``, ``10m``, ``2h`` -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        value = float(text[:-1]) * units[text[-1]] if text[-1:] in units else float(text)
    except (ValueError, IndexError):
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 90s, 10m, 1h)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("the interval must be positive")
    return value


class _SyncProgress:
    """One line per scored page on stderr, so a long first sync shows it is moving."""

    def __init__(self, project: str, stream=sys.stderr):
        self.project = project
        self.stream = stream

    def __call__(self, stage: str, done: int, total: int) -> None:
        what = "labeled tasks embedded" if stage == "labeled" else "unlabeled tasks scored"
        print(f"  project {self.project}: {done} {what}", file=self.stream, flush=True)


def _sync_projects(args: argparse.Namespace, settings: Settings) -> list[str]:
    if args.project:
        return [str(p) for p in args.project]
    from annoloop.labelstudio import LabelStudioAccess
    from sync.labelstudio_io import explain

    access = LabelStudioAccess(settings.label_studio)
    try:
        return [str(p.id) for p in access.client.projects.list()]
    except Exception as e:
        raise explain(access, e, "listing projects") from None


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def cmd_sync(args: argparse.Namespace) -> int:
    """Rank the unlabeled pool and order Label Studio's queue; once, or every --every."""
    import time

    from annoloop.logs import configure_logging

    os.environ.setdefault("YOLO_OFFLINE", "1")
    settings = _settings()
    configure_logging(settings.log_level)
    if not args.project and not args.all:
        print("annoloop sync: name --project ID (repeatable) or --all", file=sys.stderr)
        return 2
    if args.every is not None:
        import signal

        # `docker stop` sends SIGTERM: stop like Ctrl-C. A sync cut short leaves the queue on its last version.
        signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        while True:
            failures = _sync_round(args, settings)
            if args.every is None:
                return 1 if failures else 0
            time.sleep(args.every)
    except KeyboardInterrupt:
        print("annoloop sync: stopped", file=sys.stderr)
        return 0 if args.every is not None else 130


def _sync_round(args: argparse.Namespace, settings: Settings) -> int:
    """Sync every selected project once; a project that fails is reported and the others still run."""
    from sync.job import sync_project
    from sync.labelstudio_io import SyncError

    failures = 0
    try:
        projects = _sync_projects(args, settings)
    except SyncError as e:
        print(f"annoloop sync: {e}", file=sys.stderr)
        return 1
    for project in projects:
        try:
            summary = sync_project(
                project,
                settings,
                dry_run=args.dry_run,
                limit=args.limit,
                plot=Path(args.plot) if args.plot else None,
                top=args.top if args.top is not None else (20 if args.dry_run else 10),
                progress=_SyncProgress(project) if not args.quiet else lambda *a: None,
            )
        except SyncError as e:
            print(f"annoloop sync: project {project}: {e}", file=sys.stderr)
            failures += 1
            continue
        print("\n".join(summary.lines()), flush=True)
    return failures


def _access(settings: Settings):
    from annoloop.labelstudio import LabelStudioAccess

    return LabelStudioAccess(settings.label_studio, timeout_s=120.0)


def cmd_import(args: argparse.Namespace) -> int:
    """Import a VOC / YOLO / COCO folder's images as tasks; boxes kept aside unless --as-annotations."""
    from annoloop.datasets import DatasetFormatError, read_dataset
    from annoloop.model_store import ModelStore
    from annoloop.project_setup import SetupError, import_dataset

    settings = _settings()
    try:
        dataset = read_dataset(args.format, Path(args.path))
    except DatasetFormatError as e:
        print(f"annoloop import: {e}", file=sys.stderr)
        return 1
    print(
        f"{args.format} dataset {args.path}: {len(dataset.images)} images, labels {', '.join(dataset.labels)}",
        flush=True,
    )

    def progress(done: int, total: int) -> None:
        print(f"  {done}/{total} images imported", file=sys.stderr, flush=True)

    try:
        report = import_dataset(
            _access(settings),
            dataset,
            project=int(args.project) if args.project else None,
            create_title=args.create,
            storage=args.storage,
            document_root=Path(args.document_root) if args.document_root else None,
            as_annotations=args.as_annotations,
            ground_truth_dir=None,
            splits=set(args.split) if args.split else None,
            progress=progress,
            ground_truth_root=ModelStore(settings.model_dir).root,
        )
    except SetupError as e:
        print(f"annoloop import: {e}", file=sys.stderr)
        return 1
    print("\n".join(report.lines()))
    return 0


def cmd_connect(args: argparse.Namespace) -> int:
    """Connect the ML backend to a project (webhook with basic auth when configured) + uncertainty sampling."""
    from annoloop.project_setup import SetupError, connect_backend

    settings = _settings()
    auth = settings.basic_auth
    basic = (auth.user, auth.password.get_secret_value()) if auth.enabled else None
    try:
        report = connect_backend(_access(settings), int(args.project), args.url, args.title, basic)
    except SetupError as e:
        print(f"annoloop connect: {e}", file=sys.stderr)
        return 1
    print("\n".join(report.lines()))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    import signal

    from annoloop.demo import run_demo

    # Ctrl-C, `kill` and a closed terminal all stop every process the demo started. SIGINT is set explicitly
    # because a shell that starts the demo in the background (`make demo &`) hands it SIGINT ignored.
    signal.signal(signal.SIGINT, _raise_interrupt)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGHUP, _raise_interrupt)

    return run_demo(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="annoloop", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the ML backend that Label Studio connects to")
    s.add_argument("--host", default=None, help="interface to listen on (default: server.host, 127.0.0.1)")
    s.add_argument("--port", type=int, default=None, help="port (default: server.port, 9090)")
    s.set_defaults(func=cmd_serve)

    c = sub.add_parser("config", help="print the effective configuration (secrets masked)")
    c.set_defaults(func=cmd_config)

    m = sub.add_parser(
        "starter-model", help="train a small model on generated shapes and serve it by default"
    )
    m.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "annoloop" / "models"))
    m.set_defaults(func=cmd_starter_model)

    g = sub.add_parser("sample-images", help="write generated shape images to try the starter model on")
    g.add_argument("--out", default="demo-images")
    g.add_argument("--count", type=int, default=20)
    g.add_argument("--seed", type=int, default=0)
    g.set_defaults(func=cmd_sample_images)

    w = sub.add_parser(
        "worker", help="run a worker for the training and sync queues (uses the GPU when torch sees one)"
    )
    w.add_argument("--burst", action="store_true", help="run the jobs queued now, then exit")
    w.add_argument("--name", default=None, help="worker name (default: rq's random one)")
    w.set_defaults(func=cmd_worker)

    t = sub.add_parser(
        "train",
        help="train a project's model now (joins a queued or running training instead of adding one)",
        description="Enqueue a training of the project's model. A training already queued takes this request "
        "in; one running gets a single follow-up. Exit status: 0 enqueued (or, with --wait, succeeded), "
        "1 not enqueued (paused project, Redis unreachable) or the job failed, 2 bad arguments.",
    )
    t.add_argument("--project", type=_project_id, help="Label Studio project id")
    t.add_argument("--force", action="store_true", help="train even if the project is paused")
    t.add_argument("--wait", action="store_true", help="follow the job's progress until it ends")
    t.add_argument("--poll", type=float, default=1.0, help="seconds between progress checks (--wait)")
    t.add_argument("--timeout", type=float, default=None, help="give up waiting after this many seconds")
    t.add_argument(
        "--ping",
        type=float,
        default=None,
        metavar="SECONDS",
        help="instead of training, enqueue a diagnostic job that takes SECONDS: checks that a worker runs "
        "jobs (and can use CUDA); with --wait, shows its progress",
    )
    t.set_defaults(func=cmd_train)

    sy = sub.add_parser(
        "sync",
        help="rank the unlabeled tasks and order Label Studio's annotation queue",
        description="Score every unlabeled task with the served model (cached per model version and image), "
        "rank by uncertainty, diversity and class balance, import the ranking as predictions and point the "
        "project's uncertainty sampling at them. Exit status: 0 done, 1 a project could not be synced "
        "(one line says why), 2 bad arguments.",
    )
    sy.add_argument("--project", type=_project_id, action="append", help="project id (repeatable)")
    sy.add_argument("--all", action="store_true", help="every project the API key can see")
    sy.add_argument("--dry-run", action="store_true", help="print the ranking, write nothing")
    sy.add_argument(
        "--limit", type=int, default=None, metavar="N", help="rank only the N oldest unlabeled tasks"
    )
    sy.add_argument(
        "--every", type=_duration, default=None, metavar="INTERVAL", help="repeat (e.g. 10m) until stopped"
    )
    sy.add_argument(
        "--plot", default=None, metavar="PATH", help="write the uncertainty / queue make-up plot (PNG)"
    )
    sy.add_argument("--top", type=int, default=None, metavar="N", help="how much of the ranking to print")
    sy.add_argument("--quiet", action="store_true", help="no progress lines")
    sy.set_defaults(func=cmd_sync)

    im = sub.add_parser(
        "import",
        help="import a VOC / YOLO / COCO folder's images as tasks (boxes kept aside unless --as-annotations)",
    )
    im.add_argument("path", help="dataset folder")
    im.add_argument("--format", required=True, choices=["voc", "yolo", "coco"])
    target = im.add_mutually_exclusive_group(required=True)
    target.add_argument(
        "--project", type=_project_id, help="existing project (its config must have the labels)"
    )
    target.add_argument("--create", metavar="TITLE", help="create a project with a box config of the labels")
    im.add_argument("--as-annotations", action="store_true", help="import the boxes as annotations")
    im.add_argument("--split", action="append", help="only images of this dataset split (repeatable)")
    im.add_argument(
        "--storage",
        choices=["upload", "local-files"],
        default="upload",
        help="upload copies (default), or serve the files in place (Label Studio's local-files storage)",
    )
    im.add_argument(
        "--document-root", help="the server's LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT (local-files)"
    )
    im.set_defaults(func=cmd_import)

    cn = sub.add_parser(
        "connect", help="connect the ML backend to a project and turn on uncertainty sampling"
    )
    cn.add_argument("--project", required=True, type=_project_id)
    cn.add_argument("--url", required=True, help="the backend's URL as Label Studio reaches it")
    cn.add_argument("--title", default="annoloop")
    cn.set_defaults(func=cmd_connect)

    dm = sub.add_parser(
        "demo",
        help="the whole loop on this machine: Redis, Label Studio, backend, worker, sync, a simulated annotator",
    )
    dm.add_argument("--data", default=os.environ.get("DEMO_DATA") or None, help="VOC / YOLO / COCO folder")
    dm.add_argument("--format", default=os.environ.get("DEMO_FORMAT", "voc"), choices=["voc", "yolo", "coco"])
    dm.add_argument("--workdir", default=str(Path.home() / ".cache" / "annoloop" / "demo"))
    dm.add_argument("--title", default="annoloop demo")
    dm.add_argument("--images", type=int, default=240, help="size of the built-in image set")
    dm.add_argument(
        "--test-images",
        type=int,
        default=60,
        help="built-in set: extra scenes, never imported, that score every served model (a dataset's own "
        "test split plays that part for --data)",
    )
    dm.add_argument("--seed", type=int, default=0)
    dm.add_argument("--rounds", type=int, default=3, help="annotator rounds to play before handing over")
    dm.add_argument(
        "--per-round", type=int, default=20, help="labels per round (= training.min_new_annotations)"
    )
    dm.add_argument("--imgsz", type=int, default=None, help="training image size (default: 160, BCCD 320)")
    dm.add_argument("--base-epochs", type=int, default=30)
    dm.add_argument("--finetune-epochs", type=int, default=10)
    dm.add_argument("--sync-every", default="2m")
    dm.add_argument("--round-timeout", type=float, default=1800.0)
    dm.add_argument("--ls-port", type=int, default=8080, help="Label Studio port (a free one if taken)")
    dm.add_argument("--backend-port", type=int, default=9090)
    dm.add_argument("--no-keep", dest="keep", action="store_false", help="stop everything after the rounds")
    dm.add_argument(
        "--cold-start",
        action="store_true",
        help="no starter model: the queue starts by diversity and the first model is trained from scratch on the "
        "first labels (needs more rounds and epochs to get anywhere on a CPU)",
    )
    dm.set_defaults(func=cmd_demo)

    ms = sub.add_parser("models", help="list a project's model versions with their held-out metrics")
    ms.add_argument("--project", required=True, type=_project_id)
    ms.set_defaults(func=cmd_models)

    rb = sub.add_parser("rollback", help="serve an earlier version again (every backend follows)")
    rb.add_argument("--project", required=True, type=_project_id)
    rb.add_argument("--to", required=True, metavar="VERSION")
    rb.set_defaults(func=cmd_rollback)

    st = sub.add_parser("status", help="served model, training queue and whether retraining continues")
    st.add_argument("--project", required=True, type=_project_id)
    st.set_defaults(func=cmd_status)

    rp = sub.add_parser("report", help="write the learning-curve plot (PNG) and the history table")
    rp.add_argument("--project", required=True, type=_project_id)
    rp.add_argument("--out", default="reports", help="folder for the PNG and the markdown table")
    rp.set_defaults(func=cmd_report)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
