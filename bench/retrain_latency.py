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
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import redis
import requests
import torch
import yaml
from PIL import Image
from rq.job import Job

from annoloop.model_store import ModelStore
from tests.conftest import MODEL_CACHE, start_backend, start_redis
from tests.labelstudio_server import label_studio_version, start_label_studio
from tests.test_retrain_loop import CONFIG, H, W, gt_result
from training.bootstrap import TEST_RECIPES, cached_starter_model
from training.synthetic import render_scene
from training.trigger import project_state

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
    worker = backend = None
    try:
        with start_label_studio(venv, work / "ls", db_template=template) as ls:
            model_dir = work / "models"
            weights = cached_starter_model("detect", MODEL_CACHE, **TEST_RECIPES["detect"])
            ModelStore(model_dir).publish("default", "starter", weights, {})
            config = work / "annoloop.yaml"
            config.write_text(
                yaml.safe_dump(
                    {
                        "log_level": "WARNING",
                        "training": {
                            "min_new_annotations": args.tasks,
                            "imgsz": args.imgsz,
                            "batch": 8,
                            "base_epochs": args.epochs,
                            "finetune_epochs": args.epochs,
                            "workers": 0,
                            "holdout_fraction": 0.3,
                            "min_improvement": -1.0,
                            "train_args": {"nbs": 8, "close_mosaic": 1},
                        },
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
            backend = start_backend(work, env)
            worker = subprocess.Popen(
                [str(Path(sys.executable).parent / "annoloop"), "worker"],
                env={**os.environ, **env},
                stdout=(work / "worker.log").open("w"),
                stderr=subprocess.STDOUT,
            )
            folder = ls.files_root / "bench"
            folder.mkdir(parents=True)
            rng = np.random.default_rng(3)
            shapes = []
            for i in range(args.tasks + 1):
                rgb, s = render_scene(rng, W, H, max_shapes=3)
                Image.fromarray(rgb).save(folder / f"{i}.png")
                shapes.append(s)
            project = ls.create_project("annoloop bench", CONFIG)
            ls.add_local_storage(project, "bench")
            ids = ls.import_tasks(
                project, [{"image": ls.local_file_url(f"bench/{i}.png")} for i in range(len(shapes))]
            )
            ls.connect_ml_backend(project, backend.url, title="annoloop")
            probe = {
                "tasks": [{"id": ids[-1], "data": {"image": ls.local_file_url(f"bench/{args.tasks}.png")}}],
                "label_config": CONFIG,
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
                    raise SystemExit((work / "worker.log").read_text()[-3000:])
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
        for proc in (worker,):
            if proc is not None:
                proc.terminate()
                proc.wait(30)
        if backend is not None:
            backend.stop()
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


if __name__ == "__main__":
    main()
