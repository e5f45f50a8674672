"""From the webhook that crosses the retraining threshold to the first /predict answered by the new version.

Real parts: a redis-server of its own, Label Studio 1.23.2 (.ls-venv), `annoloop serve`, `annoloop worker`.
An annotator's submissions go through Label Studio, whose webhooks reach the backend; the last one crosses
`training.min_new_annotations`. The time is split into: webhook (the annotation request that carries it),
queueing (enqueued -> the worker starts), the job's stages (export, dataset, train, evaluate, publish), and
swap (job done -> the backend answers /predict with the new version).

    .venv/bin/python bench/retrain_latency.py [--tasks 20] [--epochs 3] [--imgsz 128]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import redis
import requests
import torch
from rq.job import Job

from annoloop.labelstudio_server import label_studio_version, start_label_studio
from annoloop.model_store import ModelStore
from tests.conftest import MODEL_CACHE, SHAPES_CONFIG, gt_result, shapes_project, start_loop, start_redis
from training.bootstrap import TEST_RECIPES, cached_starter_model
from training.trigger import pause, project_state

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=20, help="annotations that trigger the training")
    ap.add_argument("--epochs", type=int, default=3, help="base epochs of the (warm-started) training")
    ap.add_argument("--imgsz", type=int, default=128)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-retrain-"))
    redis_proc, redis_url = start_redis(work)
    r = redis.Redis.from_url(redis_url)
    venv = ROOT / ".ls-venv"
    template = (
        MODEL_CACHE.parent / "labelstudio" / f"label-studio-{label_studio_version(venv)}-migrated.sqlite3"
    )
    template.parent.mkdir(parents=True, exist_ok=True)
    loop = None
    try:
        with start_label_studio(venv, work / "ls", db_template=template) as ls:
            weights = cached_starter_model("detect", MODEL_CACHE, **TEST_RECIPES["detect"])
            loop = start_loop(
                work,
                ls,
                redis_url,
                weights,
                min_new_annotations=args.tasks,
                base_epochs=args.epochs,
                finetune_epochs=args.epochs,
                imgsz=args.imgsz,
                holdout_fraction=0.3,
            )
            backend, worker, model_dir = loop.backend, loop.worker, loop.model_dir
            # The webhook endpoint alone, from a client, on an event it records nothing for and on one it counts.
            hook = requests.Session()
            pause(r, "998", "benchmark: count without training")
            webhook_ms = {}
            for name, body in (
                ("ignored event", {"action": "PROJECT_UPDATED", "project": {"id": 999}}),
                (
                    "counted annotation",
                    {
                        "action": "ANNOTATION_UPDATED",
                        "project": {"id": 998},
                        "annotation": {"id": 1, "was_cancelled": False},
                    },
                ),
            ):
                times = []
                for _ in range(200):
                    t = time.perf_counter()
                    hook.post(backend.url + "/webhook", json=body, timeout=5).raise_for_status()
                    times.append((time.perf_counter() - t) * 1000)
                times.sort()
                webhook_ms[name] = (statistics.median(times), times[int(0.95 * len(times))])
            project, ids, shapes = shapes_project(ls, "bench", args.tasks + 1, seed=3, title="annoloop bench")
            ls.connect_ml_backend(project, backend.url, title="annoloop")
            probe = {
                "tasks": [{"id": ids[-1], "data": {"image": ls.local_file_url(f"bench/{args.tasks}.png")}}],
                "label_config": SHAPES_CONFIG,
                "project": f"{project}.0",
            }
            for task_id, s in zip(ids[:-2], shapes[:-2], strict=False):
                ls.api(
                    "POST",
                    f"/api/tasks/{task_id}/annotations/",
                    expected=(201,),
                    json={"result": gt_result(s), "was_cancelled": False},
                )
            # The annotation whose webhook crosses the threshold.
            t0 = time.time()
            ls.api(
                "POST",
                f"/api/tasks/{ids[-2]}/annotations/",
                expected=(201,),
                json={"result": gt_result(shapes[-2]), "was_cancelled": False},
            )
            t_webhook = time.time()
            job_id = project_state(r, str(project))["job_id"]
            assert job_id, "the threshold did not enqueue a job"
            store = ModelStore(model_dir)
            while store.current(str(project)) is None:
                if worker.poll() is not None:
                    raise SystemExit(loop.worker_log.read_text()[-3000:])
                time.sleep(0.05)
            new = store.current(str(project)).version
            while True:
                answer = requests.post(backend.url + "/predict", json=probe, timeout=60).json()
                if answer["model_version"] == new:
                    break
                time.sleep(0.02)
            t_served = time.time()
            job = Job.fetch(job_id, connection=r)
            while job.get_status(refresh=True) != "finished":
                time.sleep(0.1)
            meta = job.get_meta(refresh=True)
            stages = meta["stage_seconds"]
            enq, start, end = (x.timestamp() for x in (job.enqueued_at, job.started_at, job.ended_at))
    finally:
        if loop is not None:
            loop.stop()
        redis_proc.terminate()

    rows = [
        ("webhook (annotation request incl. webhook)", t_webhook - t0),
        ("queueing (enqueued -> worker starts job)", start - enq),
        *(
            (f"job: {name}", float(stages.get(name, 0.0)))
            for name in ("export", "dataset", "train", "evaluate", "publish")
        ),
        ("job: other (imports, setup, cleanup)", (end - start) - sum(float(v) for v in stages.values())),
        ("swap (job ended -> /predict answers new version)", t_served - min(end, t_served)),
    ]
    total = t_served - t0
    train = float(stages.get("train", 0.0))
    print(f"\nretrain latency: {args.tasks} annotations, {args.epochs} epochs at {args.imgsz} px, warm start")
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"device {'cuda' if torch.cuda.is_available() else 'cpu'}"
    )
    print(f"| {'part':<54} | {'seconds':>8} | {'share':>6} |")
    print(f"|{'-' * 56}|{'-' * 10}|{'-' * 8}|")
    for name, sec in rows:
        print(f"| {name:<54} | {sec:>8.2f} | {sec / total:>6.1%} |")
    print(f"| {'total: threshold webhook -> first new-version /predict':<54} | {total:>8.2f} | {1:>6.0%} |")
    print(
        f"| {'overhead outside training (total - train)':<54} | {total - train:>8.2f} | {(total - train) / total:>6.1%} |"
    )
    print(f"new version: {new}")
    print(f"\n/webhook alone (200 calls each, client-side ms) | {'median':>6} | {'p95':>6} |")
    for name, (med, p95) in webhook_ms.items():
        print(f"{name:<47} | {med:>6.2f} | {p95:>6.2f} |")


if __name__ == "__main__":
    main()
