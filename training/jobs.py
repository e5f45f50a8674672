"""The retraining job: export -> dataset -> train -> evaluate -> publish (or record the rejection).

``train_project`` is what the queue runs (enqueued by path, ``"training.jobs.train_project"``). It reads
the settings itself, so a worker needs only the environment the backend has.

Safety: the served model changes only through ``ModelStore.publish`` (a complete version folder renamed
into place, then the pointer replaced), as the very last step; a candidate that is not promoted leaves only
its card (``ModelStore.record_rejected``, written the same all-or-nothing way). Everything before works in
``MODEL_DIR/<project>/.work/<run>/``, removed on success and on failure, and cleared at the start of the
next run when a crash (SIGKILL, OOM, power) left it behind. A per-project file lock keeps two workers from
training the same project at once.

Bookkeeping: each training appends one row to ``MODEL_DIR/<project>/history.csv`` (:mod:`training.convergence`,
the one history file: scores, the promotion decision, the data fingerprint used to skip unchanged retrains,
and how annotators changed the pre-labels of the version served before, see :mod:`training.prelabel_review`).

Failures: a job that cannot succeed by waiting (the project does not exist, its labeling config cannot make a
detection dataset, the project id is not one) fails at once without the queue's retries; Label Studio being
unreachable, another worker holding the project, and everything else are retried with the backoff.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from annoloop.images import ImageFetcher
from annoloop.labelstudio import LabelStudioAccess
from annoloop.locks import exclusive
from annoloop.model_store import METADATA_NAME, REJECTED_DIR, ModelStore, ModelVersion
from config.settings import Settings, TrainingSettings, load_settings
from training.convergence import (
    HISTORY_NAME,
    HistoryRow,
    append_row,
    history_path,
    last_row,
    migrate_legacy_history,
)
from training.dataset import Dataset, DatasetError, ImageCache, LabeledImage, build_dataset
from training.evaluate import ModelEvaluation, evaluate_model
from training.export import LabelStudioUnavailable, ProjectExport, ProjectNotFound, export_project
from training.fit import MODEL_SETTINGS, model_task, plan_run, train_args, train_candidate
from training.prelabel_review import PrelabelReview, ReviewedTask, review

log = logging.getLogger(__name__)

__all__ = ["REJECTED_DIR", "InvalidProject", "TrainingBusy", "decide", "run_training", "train_project"]

WORK_DIR = ".work"
CACHE_DIR = ".cache"
LOCK_NAME = ".train.lock"
#: The candidate is also scored on at most this many training images (a fixed, hash-chosen sample), for the
#: training-split mAP50 the overfitting rule compares with the held-out one. Bounded so that scoring the
#: training split costs at most about as much as scoring a large held-out split.
TRAIN_EVAL_MAX_IMAGES = 200
_VERSION_RE = re.compile(r"^v(\d{3,})-")


class TrainingBusy(RuntimeError):
    """Another worker is training this project right now; retry later (the queue does)."""


class InvalidProject(ValueError):
    """The project id is not a Label Studio project id; retrying will not help."""


#: Failures no retry can fix: the job fails at once (``train_project`` turns the queue's retries off).
PERMANENT_ERRORS: tuple[type[BaseException], ...] = (ProjectNotFound, DatasetError, InvalidProject)


# --- progress ------------------------------------------------------------------------------------------


class Progress:
    """Stage and epoch progress in the RQ job's meta (when running in a job), and time per stage.

    ``job.meta["progress"]`` is the current stage, e.g. ``{"stage": "train", "epoch": 3, "epochs": 20}``;
    ``job.meta["stage_seconds"]`` the stages finished so far. Outside a job only the timings are kept.
    """

    def __init__(self) -> None:
        try:
            from rq import get_current_job

            self.job = get_current_job()
        except Exception:  # rq missing or no Redis connection: progress is optional
            self.job = None
        self.seconds: dict[str, float] = {}
        self._stage: str | None = None
        self._started = time.perf_counter()

    def _save(self, **meta: Any) -> None:
        if self.job is None:
            return
        try:
            self.job.meta.update(meta)
            self.job.save_meta()
        except Exception:  # a Redis hiccup must not fail a training run
            log.warning("could not save job progress", exc_info=True)

    def stage(self, name: str, **extra: Any) -> None:
        self._close()
        self._stage, self._started = name, time.perf_counter()
        self._save(progress={"stage": name, **extra}, stage_seconds=dict(self.seconds))

    def epoch(self, epoch: int, epochs: int) -> None:
        self._save(progress={"stage": "train", "epoch": epoch, "epochs": epochs}, epochs_done=epoch)

    def _close(self) -> None:
        if self._stage is not None:
            elapsed = time.perf_counter() - self._started
            self.seconds[self._stage] = round(self.seconds.get(self._stage, 0.0) + elapsed, 2)
            self._stage = None

    def finish(self, **extra: Any) -> None:
        self._close()
        self._save(progress={"stage": "done", **extra}, stage_seconds=dict(self.seconds))


# --- promotion -----------------------------------------------------------------------------------------


@dataclass
class Decision:
    """Whether the candidate replaces the served model, and why, in words for the model card."""

    promote: bool
    metric: str
    candidate: float | None
    current: float | None
    improvement: float | None
    reasons: list[str] = field(default_factory=list)


def decide(
    metric: str,
    min_improvement: float,
    candidate: dict[str, Any],
    current: dict[str, Any] | None,
    holdout_objects: int,
) -> Decision:
    """Promote when there is no current model, or when the candidate beats it on ``metric`` by at least
    ``min_improvement`` on the same held-out tasks. Without a labeled object held out there is no evidence
    either way, so a current model stays."""
    cand = candidate.get(metric)
    if current is None:
        return Decision(True, metric, cand, None, None, ["no current model: the first model is published"])
    cur = current.get(metric)
    if holdout_objects == 0 or cand is None or cur is None:
        return Decision(
            False,
            metric,
            cand,
            cur,
            None,
            ["the held-out tasks have no labeled object: no evidence that the candidate is better"],
        )
    gain = float(cand) - float(cur)
    if gain >= min_improvement:
        reason = f"{metric} {cand:.4f} vs {cur:.4f}: +{gain:.4f} >= min_improvement {min_improvement}"
        return Decision(True, metric, cand, cur, gain, [reason])
    reason = f"{metric} {cand:.4f} vs {cur:.4f}: {gain:+.4f} < min_improvement {min_improvement}"
    return Decision(False, metric, cand, cur, gain, [reason])


# --- bookkeeping ---------------------------------------------------------------------------------------


def data_fingerprint(export: ProjectExport, training: TrainingSettings) -> str:
    """Changes exactly when a retrain could change: an annotation, the labeling config, the settings."""
    payload = {
        "tasks": sorted((t.task_id, t.annotation_id, t.updated_at) for t in export.tasks),
        "config": export.label_config,
        "training": training.model_dump(mode="json", include=set(MODEL_SETTINGS)),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def next_version(project_dir: Path, now: datetime) -> str:
    """``v<n>-<UTC time>``, n one above every version published or rejected so far (names sort by age)."""
    numbers = [0]
    for folder in (project_dir, project_dir / REJECTED_DIR):
        if folder.is_dir():
            numbers += [int(m.group(1)) for p in folder.iterdir() if (m := _VERSION_RE.match(p.name))]
    return f"v{max(numbers) + 1:03d}-{now.strftime('%Y%m%dT%H%M%SZ')}"


def train_sample(items: list[LabeledImage], limit: int = TRAIN_EVAL_MAX_IMAGES) -> list[LabeledImage]:
    """At most ``limit`` training images, chosen by a hash of the task id: the same tasks from run to run
    (as the project grows, a new task enters the sample only in place of one that hashes higher)."""
    key = lambda item: hashlib.sha1(f"train-eval:{item.task_id}".encode()).digest()  # noqa: E731
    return sorted(items, key=key)[:limit]


def prelabel_review(export: ProjectExport, from_name: str) -> PrelabelReview:
    """What annotators did to the pre-labels their annotations started from, per model version."""
    return review(
        (
            ReviewedTask(t.task_id, t.prediction.model_version, t.prediction.result, t.result)
            for t in export.tasks
            if t.prediction is not None
        ),
        from_name=from_name,
    )


def _project_lock(project_dir: Path) -> contextlib.AbstractContextManager[None]:
    return exclusive(
        project_dir / LOCK_NAME,
        lambda: TrainingBusy(f"project {project_dir.name} is being trained by another worker"),
    )


def _clear_stale_work(work_root: Path) -> None:
    """Left-overs of runs that crashed; only called with the project lock held, so nobody uses them."""
    if work_root.is_dir():
        for p in work_root.iterdir():
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def _versions_info() -> dict[str, str]:
    import torch
    import ultralytics

    return {"ultralytics": ultralytics.__version__, "torch": torch.__version__}


# --- the job -------------------------------------------------------------------------------------------


def train_project(project: str, force: bool = False) -> dict[str, Any]:
    """Queue entry point: retrain Label Studio project ``project`` (its id) with the configured settings.

    ``force`` trains even when no annotation, config or setting changed since the last run.
    Raises ``LabelStudioUnavailable`` or ``TrainingBusy`` (the queue retries with its backoff), and
    ``ProjectNotFound``, ``DatasetError`` or ``InvalidProject`` (fix the project; these turn the job's
    remaining retries off, so it fails at once with that message). Returns the summary of
    :func:`run_training`, plus the convergence verdict after a training.
    """
    import redis
    from rq import get_current_job

    from training import trigger
    from training.convergence import ConvergenceRules, decide, read_history

    job = get_current_job()
    project = str(project)
    try:
        if not project.isdigit():
            raise InvalidProject(f"project must be a Label Studio project id, got {project!r}")
        settings = load_settings()
        r = redis.Redis.from_url(settings.redis_url)
        if job is not None:
            job.meta["attempts"] = int(job.meta.get("attempts") or 0) + 1
            job.save_meta()
            trigger.mark_started(r, project)  # annotations from now on count toward the next training
        summary = run_training(project, settings, force=force)
    except PERMANENT_ERRORS as e:
        if job is not None and job.retries_left:
            # rq decides on the job object it runs (the one get_current_job returns in the work horse):
            # with no retries left, this failure is final and the trigger's next request starts afresh.
            job.retries_left = 0
        log.error(
            "training failed: not retried",
            extra={
                "project": project,
                "job_id": job.id if job else None,
                "error": f"{type(e).__name__}: {e}",
            },
        )
        raise
    if not summary.get("skipped") and summary.get("version"):
        verdict = decide(
            read_history(history_path(settings.model_dir, project)),
            ConvergenceRules(**settings.training.convergence.model_dump()),
        )
        summary["convergence"] = {"keep_training": verdict.keep_training, "reason": verdict.reason}
        if not verdict.keep_training:
            trigger.pause(r, project, verdict.reason)
            log.info("automatic retraining paused", extra={"project": project, "reason": verdict.reason})
    if job is not None:
        trigger.mark_finished(r, project)  # only on success: a failed attempt is retried by the queue
    if summary.get("promoted") and settings.sync.after_promotion:
        _enqueue_sync(r, project, str(summary["version"]))
    return summary


def _enqueue_sync(r: Any, project: str, version: str) -> None:
    """Re-rank the queue with the new model (its own job: a failed sync must not fail the training)."""
    from sync.queue import enqueue_sync

    try:
        job = enqueue_sync(r, project, reason=version)
        log.info(
            "sync enqueued after promotion", extra={"project": project, "version": version, "job": job.id}
        )
    except Exception:
        log.exception("could not enqueue the sync after promotion", extra={"project": project})


def run_training(project: str, settings: Settings, force: bool = False) -> dict[str, Any]:
    """One training run for ``project`` with explicit ``settings``; see :func:`train_project`.

    Returns ``{"project", "promoted", "skipped", "version", "parent", "metric", "improvement",
    "metrics": {"candidate", "current"}, "reasons", "seconds", "model_card"}``.
    """
    os.environ.setdefault("YOLO_OFFLINE", "1")
    if not str(project).isdigit():
        raise InvalidProject(f"project must be a Label Studio project id, got {project!r}")
    store = ModelStore(settings.model_dir)
    project_dir = store.pointer(project).parent  # validates the name
    with _project_lock(project_dir):
        migrate_legacy_history(project_dir)
        work_root = project_dir / WORK_DIR
        _clear_stale_work(work_root)
        work_root.mkdir(parents=True, exist_ok=True)
        workdir = Path(tempfile.mkdtemp(dir=work_root, prefix="run-")).resolve()
        try:
            return _run(project, settings, store, project_dir, workdir, force)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)


def _run(
    project: str, settings: Settings, store: ModelStore, project_dir: Path, workdir: Path, force: bool
) -> dict[str, Any]:
    t = settings.training
    progress = Progress()
    started = time.perf_counter()
    created = datetime.now(UTC)

    progress.stage("export")
    access = LabelStudioAccess(settings.label_studio)
    export = export_project(access, int(project), page_size=t.export_page_size)
    served = store.served(project)
    # Only a detection model can be compared on boxes and fine-tuned into one. The project's own versions
    # always are; a default model may be a segmentation or classification model, which this job neither
    # starts from nor has to beat (it is recorded in the card as what was served).
    served_task = model_task(served.weights) if served is not None else None
    parent = served if served_task == "detect" else None
    own_versions = len(store.versions(project))
    fingerprint = data_fingerprint(export, t)

    summary: dict[str, Any] = {
        "project": project,
        "promoted": False,
        "skipped": False,
        "version": None,
        "parent": _describe_parent(parent),
        "served_before": _describe_parent(served),
        "metric": t.promote_metric,
        "improvement": None,
        "metrics": {"candidate": None, "current": None},
        "reasons": [],
        "seconds": {},
        "model_card": None,
    }
    if not force:
        same = [
            label
            for label, fp in (
                ("the current model", parent.metadata().get("data_fingerprint") if parent else None),
                ("the last attempt", getattr(last_row(project_dir / HISTORY_NAME), "data_fingerprint", None)),
            )
            if fp == fingerprint
        ]
        if same:
            summary.update(skipped=True, reasons=[f"nothing changed since {same[0]} (force=True retrains)"])
            progress.finish(skipped=True)
            summary["seconds"] = dict(progress.seconds)
            return summary

    progress.stage("dataset")
    fetcher = ImageFetcher(access, settings.images)
    try:
        dataset = build_dataset(
            export,
            workdir / "data",
            holdout_fraction=t.holdout_fraction,
            download=fetcher.download,
            cache=ImageCache(project_dir / CACHE_DIR / "images"),
            max_pixels=settings.images.max_pixels,
            workers=settings.images.fetch_workers,
        )
    finally:
        fetcher.close()
    report = dataset.report
    if report.unreadable_images and not report.tasks_used:
        first = next(iter(report.unreadable_images.items()))
        raise LabelStudioUnavailable(
            f"none of the {len(report.unreadable_images)} labeled images could be read from Label Studio at "
            f"{settings.label_studio.url} (task {first[0]}: {first[1]})"
        )
    if not dataset.train_ids or not any(n for n in report.boxes_per_class.values()):
        reason = (
            f"nothing to learn from: {report.train_tasks} training images with "
            f"{report.boxes} boxes in total ({report.tasks_exported} labeled tasks exported)"
        )
        summary["reasons"] = [reason]
        progress.finish(skipped=True)
        summary.update(skipped=True, seconds=dict(progress.seconds))
        log.warning("training skipped", extra={"project": project, "reason": reason})
        return summary

    from ml_backend.inference import resolve_device

    device = resolve_device(t.device)
    plan = plan_run(t, parent.weights if parent else None, own_versions)
    args = train_args(t, plan, dataset, device, workdir / "runs")
    progress.stage("train", epoch=0, epochs=plan.epochs)
    weights = train_candidate(args, plan.init, on_epoch=progress.epoch)

    progress.stage("evaluate", model="candidate")
    eval_kw: dict[str, Any] = dict(
        conf=settings.inference.prelabel_conf,
        iou_nms=settings.inference.iou,
        imgsz=settings.inference.imgsz or t.imgsz,
        device=device,
        batch=settings.inference.batch_size,
    )
    cand = evaluate_model(
        weights,
        dataset,
        workdir=workdir / "eval" / "candidate",
        mapping=_identity(dataset),
        label="candidate",
        **eval_kw,
    )
    # The same scores on (a sample of) the training split: the overfitting rule compares the two mAP50s.
    train_eval = evaluate_model(
        weights,
        dataset,
        items=train_sample(dataset.train),
        workdir=workdir / "eval" / "train",
        mapping=_identity(dataset),
        label="candidate (training split)",
        **eval_kw,
    )
    current: ModelEvaluation | None = None
    if parent is not None:
        progress.stage("evaluate", model="current")
        current = evaluate_model(
            parent.weights,
            dataset,
            workdir=workdir / "eval" / "current",
            label=f"{parent.project}/{parent.version}",
            **eval_kw,
        )
    decision = decide(
        t.promote_metric,
        t.min_improvement,
        cand.overall,
        current.overall if current else None,
        dataset.holdout_boxes,
    )
    if served is not None and parent is None:
        decision.reasons.insert(
            0, f"the served model {served.project}/{served.version} is a {served_task} model: not compared"
        )

    progress.stage("publish")
    version = next_version(project_dir, created)
    reviewed = prelabel_review(export, dataset.control.from_name)
    served_review = reviewed.version(served.version if served is not None else None)
    card = _model_card(
        project,
        version,
        settings,
        export,
        dataset,
        plan.to_dict(),
        args,
        parent,
        cand,
        current,
        decision,
        train_eval,
    )
    card["served_before"] = summary["served_before"]
    card["prelabel_review"] = reviewed.to_dict()
    card["data_fingerprint"] = fingerprint
    card["created_at"] = created.isoformat()
    card["seconds"] = {**progress.seconds, "total": round(time.perf_counter() - started, 2)}
    if decision.promote:
        mv = store.publish(project, version, weights, card)
    else:
        mv = store.record_rejected(project, version, card)
    card_path = mv.path / METADATA_NAME
    progress.finish(promoted=decision.promote, version=version)
    counts = served_review.counts if served_review is not None else None
    append_row(
        project_dir / HISTORY_NAME,
        HistoryRow(
            version=version,
            promoted=decision.promote,
            labeled_tasks=len(dataset.train_ids) + len(dataset.holdout_ids),
            heldout_map50=float(cand.overall.get("mAP50") or 0.0),
            heldout_map50_95=float(cand.overall.get("mAP50-95") or 0.0),
            train_map50=_float_or_none(train_eval.overall.get("mAP50")),
            created_at=created.isoformat(),
            parent=f"{parent.project}/{parent.version}" if parent else "",
            metric=decision.metric,
            candidate=_float_or_none(decision.candidate),
            current=_float_or_none(decision.current),
            data_fingerprint=fingerprint,
            prelabel_version=served.version if served_review is not None and served is not None else "",
            prelabel_predicted=counts.predicted if counts else None,
            prelabel_accepted=counts.accepted if counts else None,
            prelabel_corrected=counts.corrected if counts else None,
            prelabel_rejected=counts.rejected if counts else None,
            prelabel_added=counts.added if counts else None,
            prelabel_acceptance=served_review.to_dict()["acceptance_rate"] if served_review else None,
            reason="; ".join(decision.reasons),
            model_card=str(card_path),
            holdout_tasks=len(dataset.holdout_ids),
        ),
    )
    log.info(
        "training finished",
        extra={
            "project": project,
            "version": version,
            "promoted": decision.promote,
            "reasons": decision.reasons,
            "heldout_map50": cand.overall.get("mAP50"),
            "train_map50": train_eval.overall.get("mAP50"),
            "prelabel_review": {
                v: {k: r[k] for k in ("predicted", "accepted", "corrected", "rejected", "added")}
                for v, r in card["prelabel_review"]["versions"].items()
            },
        },
    )
    summary.update(
        promoted=decision.promote,
        version=version,
        improvement=decision.improvement,
        metrics={
            "candidate": cand.overall,
            "current": current.overall if current else None,
            "train": train_eval.overall,
        },
        reasons=decision.reasons,
        prelabel_review=served_review.to_dict() if served_review is not None else None,
        seconds={**progress.seconds, "total": round(time.perf_counter() - started, 2)},
        model_card=str(card_path),
    )
    return summary


def _float_or_none(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) else None


def _identity(dataset: Dataset) -> dict[int, int]:
    """The candidate was trained on the dataset's classes: its class i is the config's label i."""
    return {i: i for i in range(len(dataset.classes))}


def _describe_parent(parent: ModelVersion | None) -> dict[str, str] | None:
    return None if parent is None else {"project": parent.project, "version": parent.version}


def _model_card(
    project: str,
    version: str,
    settings: Settings,
    export: ProjectExport,
    dataset: Dataset,
    plan: dict[str, Any],
    args: dict[str, Any],
    parent: ModelVersion | None,
    cand: ModelEvaluation,
    current: ModelEvaluation | None,
    decision: Decision,
    train_eval: ModelEvaluation,
) -> dict[str, Any]:
    """Everything needed to understand, compare and reproduce this version (no secrets)."""
    return {
        "kind": "annoloop detection model",
        "project": project,
        "version": version,
        "label_studio": {
            "url": settings.label_studio.url,
            "project": export.project_id,
            "title": export.title,
        },
        "parent": _describe_parent(parent),
        "classes": list(dataset.classes),
        "label_config_sha256": hashlib.sha256(export.label_config.encode()).hexdigest(),
        "task_ids": {"train": sorted(dataset.train_ids), "holdout": sorted(dataset.holdout_ids)},
        "dataset": dataset.report.to_dict(),
        "training": {"plan": plan, "ultralytics_args": args, **_versions_info()},
        "settings": {
            "training": settings.training.model_dump(mode="json"),
            "inference": settings.inference.model_dump(mode="json"),
        },
        "metrics": {
            "candidate": cand.to_dict(),
            "current": current.to_dict() if current else None,
            "train": train_eval.to_dict(),
        },
        "error_analysis": {
            "candidate": asdict(cand.errors),
            "current": asdict(current.errors) if current else None,
        },
        "decision": asdict(decision),
    }
