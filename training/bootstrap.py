"""Train a tiny "starter" YOLO model from scratch on synthetic shapes, offline, on a CPU, in minutes.

Why: the test-suite and ``make demo`` need a model that really detects things, but this project must work
without network access, so no pretrained weights can be fetched. ``yolo11n`` from its YAML learns the
three shapes of :mod:`training.synthetic` well enough in a few CPU minutes. :func:`cached_starter_model`
makes that a one-off cost per recipe (and per change of the generated data or of the training defaults)
by caching the weights on disk. Training is deterministic for a seed: reruns on this machine reproduced
the same metrics to the last digit (ultralytics trains on one torch thread on a 2-core CPU).

ultralytics is imported lazily: importing it costs seconds, and this module must be importable cheaply
(e.g. to read the recipes). ``YOLO_OFFLINE=1`` is set (unless already set) before that import so that
ultralytics does not probe the network (DNS look-ups, analytics) on machines that have none.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from training.synthetic import CLASSES, write_yolo_dataset

Task = Literal["detect", "segment", "classify"]

#: Recipes for test fixtures, measured on a 2-core CPU (no GPU, ultralytics 8.4.190, one torch thread).
#: detect: ~95 s; val mAP50 0.92-0.97 over seeds 0-2; on 200 fresh 640x480 scenes (predict imgsz=128,
#: conf=0.25) 96-98% of shapes get a box at IoU > 0.5 and 85-91% also the right class (circle vs square
#: is the usual mix-up at this resolution). segment: ~80 s, mask mAP50 ~0.9. classify: ~30 s, top1
#: ~0.65; those two only need to load and predict. Bigger recipes: see DEMO_RECIPE.
TEST_RECIPES: dict[str, dict[str, Any]] = {
    "detect": dict(epochs=15, imgsz=128, n_train=300, n_val=60, batch=16, close_mosaic=4),
    "segment": dict(epochs=12, imgsz=128, n_train=200, n_val=40, batch=16, close_mosaic=4),
    "classify": dict(epochs=20, imgsz=64, n_train=300, n_val=60, batch=32),
}

#: What ``make demo`` trains: bigger (~3 min on 2 cores, val mAP50 0.98; on fresh scenes 99.8% of shapes
#: boxed at IoU > 0.5, 97.5% with the right class) and at imgsz 160, so that the smallest shapes of a
#: 640x480 frame keep ~14 pixels (11 at imgsz 128). ``model.predict`` defaults to the trained imgsz.
DEMO_RECIPE: dict[str, Any] = dict(
    task="detect", epochs=15, imgsz=160, n_train=400, n_val=80, batch=16, close_mosaic=5
)

_MODEL_YAML = {"detect": "yolo11n.yaml", "segment": "yolo11n-seg.yaml", "classify": "yolo11n-cls.yaml"}

#: ultralytics arguments tuned for tiny from-scratch runs; any of them can be overridden per recipe.
_TRAIN_DEFAULTS: dict[str, Any] = dict(
    batch=16,
    # One optimizer step per batch: the default nbs=64 accumulates 4 batches of 16, leaving only a handful
    # of optimizer steps per epoch on a few hundred images.
    nbs=16,
    workers=0,  # subprocess workers compete with training for the 2 cores and cost start-up time
    cache=False,  # "ram" warns of non-determinism, and decoding tiny JPEGs is cheap anyway
    warmup_epochs=1,
    close_mosaic=4,
    # Validate only after the last epoch (best.pt is then the last epoch): per-epoch validation costs
    # ~20% of a short run, and early epochs' validation is the slowest (thousands of low-confidence boxes).
    val=False,
    patience=1000,  # never stop early: the recipe's epochs are the contract
    pretrained=False,
    amp=False,  # the AMP check would download a model; AMP is for CUDA anyway
    plots=False,  # plots download a font
    verbose=False,
    deterministic=True,
    exist_ok=True,
)

#: Per-task additions. The classifier's default RandAugment + random erasing slow learning a lot on
#: 64-pixel single-shape images (top1 0.58 vs 0.85 after 10-15 epochs).
_TASK_DEFAULTS: dict[str, dict[str, Any]] = {"classify": dict(erasing=0.0, auto_augment=None)}


def _import_yolo() -> Any:
    """Import ``ultralytics.YOLO`` lazily, offline: ``YOLO_OFFLINE`` must be set before the first import."""
    os.environ.setdefault("YOLO_OFFLINE", "1")
    from ultralytics import YOLO

    return YOLO


def _summarise(task: Task, raw: dict[str, float]) -> dict[str, float]:
    """Friendly metric names from ultralytics' ``results_dict`` (keys like ``metrics/mAP50(B)``)."""
    if task == "classify":
        return {"top1": raw.get("metrics/accuracy_top1", 0.0), "top5": raw.get("metrics/accuracy_top5", 0.0)}
    out = {"mAP50": raw.get("metrics/mAP50(B)", 0.0), "mAP50-95": raw.get("metrics/mAP50-95(B)", 0.0)}
    if task == "segment":
        out |= {
            "mask_mAP50": raw.get("metrics/mAP50(M)", 0.0),
            "mask_mAP50-95": raw.get("metrics/mAP50-95(M)", 0.0),
        }
    return out


def train_starter_model(
    out_path: Path,
    task: Task = "detect",
    *,
    epochs: int,
    imgsz: int,
    n_train: int,
    n_val: int,
    seed: int = 0,
    device: str = "cpu",
    workdir: Path | None = None,
    **train_overrides: Any,
) -> dict[str, Any]:
    """Generate a synthetic dataset, train ``yolo11n`` on it from scratch and write the best weights.

    Everything ultralytics writes (dataset caches, ``runs/``) goes under ``workdir`` (a temporary folder,
    deleted afterwards, when None), never into the current directory. ``out_path`` appears atomically, so a
    reader never sees a half-written file. ``train_overrides`` are passed to ``model.train`` (e.g.
    ``batch``, ``mosaic``, ``lr0``). Returns the recipe, the seconds taken and the final validation metrics
    of the best checkpoint (``mAP50``/``mAP50-95`` for detect and segment, ``top1`` for classify).
    """
    if task not in _MODEL_YAML:
        raise ValueError(f"unknown task {task!r}")
    out_path = Path(out_path)
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="annoloop-train-")))
        workdir = Path(workdir).resolve()
        data = write_yolo_dataset(workdir / "data", task, n_train, n_val, imgsz, seed)
        data_seconds = time.perf_counter() - start
        YOLO = _import_yolo()
        model = YOLO(_MODEL_YAML[task])
        args = _TRAIN_DEFAULTS | _TASK_DEFAULTS.get(task, {}) | train_overrides
        results = model.train(
            data=str(data),
            epochs=epochs,
            imgsz=imgsz,
            seed=seed,
            device=device,
            project=str(workdir / "runs"),  # absolute: otherwise ultralytics uses its settings' runs_dir
            name=task,
            **args,
        )
        best = Path(model.trainer.best)
        names = dict(YOLO(best).names)
        if names != dict(enumerate(CLASSES)):
            raise RuntimeError(f"trained model has class names {names}, expected {CLASSES}")
        out_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = out_path.with_name(f".{out_path.name}.{os.getpid()}.tmp")
        shutil.copyfile(best, tmp)
        os.replace(tmp, out_path)
    raw = dict(results.results_dict) if results is not None else {}
    return {
        "task": task,
        "epochs": epochs,
        "imgsz": imgsz,
        "n_train": n_train,
        "n_val": n_val,
        "seed": seed,
        **_summarise(task, raw),
        "seconds": round(time.perf_counter() - start, 1),
        "data_seconds": round(data_seconds, 1),
        "train_args": args,
        "raw_metrics": raw,
    }


def _data_fingerprint(task: Task) -> str:
    """Hash of a tiny dataset written by the current generator: changes exactly when the data would.

    Hashing output rather than source means reformatting or commenting ``synthetic.py`` keeps the cache,
    while any change to pixels, labels or layout retrains.
    """
    digest = hashlib.sha256()
    with tempfile.TemporaryDirectory(prefix="annoloop-fp-") as tmp:
        root = Path(tmp) / "ds"
        write_yolo_dataset(root, task, n_train=3, n_val=1, imgsz=64, seed=0)
        for f in sorted(root.rglob("*")):
            if f.is_file() and f.name != "data.yaml":  # data.yaml holds the (temporary) absolute path
                digest.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes())
    return digest.hexdigest()


def recipe_key(task: str, **recipe: Any) -> str:
    """Hash identifying a trained model: recipe, training defaults, library versions and generated data."""
    import torch
    import ultralytics

    payload = {
        "task": task,
        **recipe,
        "defaults": _TRAIN_DEFAULTS | _TASK_DEFAULTS.get(task, {}),
        "model": _MODEL_YAML[task],
        "ultralytics": ultralytics.__version__,
        "torch": torch.__version__.split("+")[0],
        "data": _data_fingerprint(task),  # type: ignore[arg-type]
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive advisory lock: concurrent processes (pytest-xdist workers, demo + tests) train only once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def cached_starter_model(task: str, cache_dir: Path, **recipe: Any) -> Path:
    """Path of starter weights for ``task`` and ``recipe`` under ``cache_dir``, training them if missing.

    ``recipe`` takes the keyword arguments of :func:`train_starter_model` (epochs, imgsz, n_train, n_val,
    seed, ...). The weights are ``<cache_dir>/<task>-<key>.pt``, with the training summary next to them as
    ``.json``. A file lock makes racing processes wait for one training instead of each doing it.
    """
    if task not in _MODEL_YAML:
        raise ValueError(f"unknown task {task!r}")
    _import_yolo()  # sets YOLO_OFFLINE before ultralytics is first imported by recipe_key
    cache_dir = Path(cache_dir)
    recipe = {"seed": 0, **recipe}
    key = recipe_key(task, **{k: v for k, v in recipe.items() if k not in ("device", "workdir")})
    weights = cache_dir / f"{task}-{key}.pt"
    if weights.exists():
        return weights
    with _file_lock(cache_dir / f"{task}-{key}.lock"):
        if weights.exists():  # another process trained it while we waited
            return weights
        with tempfile.TemporaryDirectory(prefix="train-", dir=cache_dir) as work:
            tmp_weights = Path(work) / "best.pt"
            summary = train_starter_model(tmp_weights, task, workdir=Path(work), **recipe)  # type: ignore[arg-type]
            # Summary first, weights last: whoever sees the weights also finds the summary.
            weights.with_suffix(".json").write_text(
                json.dumps({**summary, "key": key}, indent=2, default=str)
            )
            os.replace(tmp_weights, weights)
    return weights
