"""The RQ queue training jobs run on, what every job there carries, and watching a job's progress.

Training jobs are enqueued by dotted path (``training.jobs.train_project``), so the web process never imports
training code (torch, ultralytics): only the worker (``annoloop worker``) does, when it runs a job. Every job
gets the configured timeout, result and failure TTLs, and training jobs retry with backoff on failure
(``training.retry_max`` / ``training.retry_intervals_s``): a worker runs rq's scheduler for the delayed retries.
Two kinds of failure do not wait for the backoff: one no retry can fix (the job function turns its retries
off, see ``training.jobs.PERMANENT_ERRORS``), and a job abandoned by a worker that died (SIGKILL, OOM, lost
machine), which :func:`on_training_failure` re-enqueues at once.

``ping`` is a real, tiny job for diagnostics (``annoloop train --ping``): it checks a worker is listening,
reports progress the way training does, and says whether the worker process can use CUDA.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlparse

import redis
from rq import Callback, Queue, Retry
from rq.exceptions import AbandonedJobError
from rq.job import Job, JobStatus

from config.settings import TrainingSettings, load_settings

log = logging.getLogger(__name__)

QUEUE_NAME = "training"
# Enqueued by name so that enqueueing needs no training code; the worker imports it.
TRAIN_FUNC = "training.jobs.train_project"
PING_FUNC = "training.queue.ping"
TERMINAL = frozenset({JobStatus.FINISHED, JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED})


class TrainingQueue(Queue):
    """An rq ``Queue`` whose jobs keep results and failures for the configured times unless told otherwise."""

    def __init__(self, *args: Any, result_ttl: int | None = None, failure_ttl: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.result_ttl = result_ttl
        self.failure_ttl = failure_ttl

    def create_job(self, func: Any, **kwargs: Any) -> Job:  # rq passes everything but func by keyword
        if kwargs.get("result_ttl") is None:
            kwargs["result_ttl"] = self.result_ttl
        if kwargs.get("failure_ttl") is None:
            kwargs["failure_ttl"] = self.failure_ttl
        return super().create_job(func, **kwargs)


def _training_settings(settings: TrainingSettings | None) -> TrainingSettings:
    return settings if settings is not None else load_settings().training


def training_queue(redis_client: redis.Redis, settings: TrainingSettings | None = None) -> Queue:
    """The ``training`` queue on ``redis_client``: job timeout, result and failure TTLs from the config
    (``settings`` or, when not given, the ``training`` section of the loaded configuration)."""
    s = _training_settings(settings)
    return TrainingQueue(
        QUEUE_NAME,
        connection=redis_client,
        default_timeout=s.job_timeout_s,
        result_ttl=s.result_ttl_s,
        failure_ttl=s.failure_ttl_s,
    )


def retry_policy(settings: TrainingSettings | None = None) -> Retry | None:
    """Retries with backoff for a failed training job (e.g. Label Studio briefly unreachable); None if off."""
    s = _training_settings(settings)
    if s.retry_max == 0:
        return None
    return Retry(max=s.retry_max, interval=list(s.retry_intervals_s))


def on_training_failure(job: Job, connection: redis.Redis, exc_type: type, exc_value: Any, tb: Any) -> None:
    """rq failure callback of training jobs: a job abandoned by a dead worker is retried at once.

    rq notices an abandoned job when its heartbeat has expired (``StartedJobRegistry.cleanup``, run by a
    worker's maintenance or by :mod:`training.trigger` when a request finds the project stuck on it) and then
    retries it per its ``Retry``, i.e. after the backoff, through the scheduler. Nothing is wrong with
    Label Studio in that case, and the scheduler may well have died with the worker (a new worker only takes
    the scheduler over when the dead one's lock expires and its own maintenance comes round, up to minutes
    later): so this retry goes straight onto the queue. The retry still counts against ``retry_max``.
    Called by rq with the job object it is about to retry; later retries keep their backoff.
    """
    if not (isinstance(exc_value, AbandonedJobError) or exc_type is AbandonedJobError):
        return
    if job.retries_left and job.retry_intervals:
        # rq waits intervals[len(intervals) - retries_left] (the first value while more retries are left than
        # values): spell the list out to one value per retry left, then make only this one immediate.
        intervals = list(job.retry_intervals)
        if job.retries_left > len(intervals):
            intervals = [intervals[0]] * (job.retries_left - len(intervals)) + intervals
        intervals[len(intervals) - job.retries_left] = 0
        job.retry_intervals = intervals
    log.warning(
        "training job abandoned by its worker",
        extra={
            "job_id": job.id,
            "project": (job.meta or {}).get("project"),
            "retries_left": job.retries_left,
            "retry": "now" if job.retries_left else "none left",
        },
    )


def enqueue_training(
    redis_client: redis.Redis,
    project: str,
    *,
    force: bool = False,
    job_id: str | None = None,
    reason: str = "manual",
    settings: TrainingSettings | None = None,
    meta: Mapping[str, Any] | None = None,
) -> Job:
    """Enqueue ``training.jobs.train_project(project, force=force)`` with the configured retry policy.

    Low level: it does not coalesce. Automatic and manual triggers go through ``training.trigger``, which
    decides whether a job is due and calls this.
    """
    s = _training_settings(settings)
    job = training_queue(redis_client, s).enqueue_call(
        TRAIN_FUNC,
        args=(str(project),),
        kwargs={"force": bool(force)},
        job_id=job_id,
        description=f"train project {project} ({reason})",
        meta={"project": str(project), "reason": reason, **(meta or {})},
        retry=retry_policy(s),
        on_failure=Callback(f"{__name__}.on_training_failure"),
    )
    log.info(
        "training job enqueued",
        extra={"project": str(project), "job_id": job.id, "reason": reason, "force": bool(force)},
    )
    return job


def enqueue_ping(
    redis_client: redis.Redis, seconds: float = 0.0, settings: TrainingSettings | None = None
) -> Job:
    """Enqueue the diagnostic ``ping`` job on the training queue (no retries: a failure is the answer)."""
    return training_queue(redis_client, settings).enqueue_call(
        PING_FUNC, args=(seconds,), description=f"ping ({seconds:g} s)", meta={"reason": "ping"}
    )


def ping(seconds: float = 0.0, steps: int = 3) -> dict[str, Any]:
    """Diagnostic job: takes ``seconds`` in ``steps`` steps, reporting each in ``job.meta["progress"]`` like
    training does, and answers where it ran and whether that process can use CUDA."""
    from rq import get_current_job

    if seconds < 0:
        raise ValueError(f"ping: seconds must be >= 0 (got {seconds:g})")
    if steps < 1:
        raise ValueError(f"ping: steps must be >= 1 (got {steps})")
    job = get_current_job()
    for i in range(1, steps + 1):
        time.sleep(seconds / steps)
        if job is not None:
            job.meta["progress"] = {"epoch": i, "epochs": steps, "stage": "ping"}
            job.save_meta()
    return {
        "pong": True,
        "steps": steps,
        "seconds": seconds,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "cuda": _cuda_in_this_process(),
    }


def _cuda_in_this_process() -> dict[str, Any] | None:
    """Whether this process can run on CUDA, proven by one tiny tensor; None when torch is not loaded
    (the worker loads it at start, so a ping through ``annoloop worker`` always answers)."""
    if "torch" not in sys.modules:
        return None
    import torch

    if not torch.cuda.is_available():
        return {"available": False}
    value = torch.ones(1, device="cuda").sum().item()  # fails if CUDA cannot start in this (forked) process
    return {"available": value == 1.0, "device": torch.cuda.get_device_name(0)}


def describe_device() -> str:
    """The device training jobs will find, e.g. ``cuda (1 GPU: NVIDIA H100 80GB HBM3)`` or ``cpu``.

    rq's worker forks a process per job, and CUDA cannot start in a child once the parent has initialised it:
    the check goes through NVML (``PYTORCH_NVML_BASED_CUDA_CHECK``) and ``nvidia-smi`` so this process stays
    CUDA-free. Importing torch here also means each job's process starts with torch already loaded.
    """
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    try:
        import torch
    except ImportError:  # pragma: no cover - torch comes with ultralytics
        return "cpu (torch is not installed)"
    if not torch.cuda.is_available():
        return "cpu"
    count = torch.cuda.device_count()
    names: list[str] = []
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run(
                [smi, "--query-gpu=name", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=10,
                check=True,
            )
            names = [line.strip() for line in out.stdout.splitlines() if line.strip()]
        except (OSError, subprocess.SubprocessError):
            names = []
    label = f"{count} GPU" + ("s" if count != 1 else "")
    return f"cuda ({label}: {', '.join(names)})" if names else f"cuda ({label})"


def redis_location(url: str) -> str:
    """``host:port/db`` of a Redis URL, without the password, for logs and messages."""
    u = urlparse(url)
    if u.scheme == "unix":
        return u.path
    return f"{u.hostname}:{u.port or 6379}{u.path or ''}"


# --- Watching a job --------------------------------------------------------------------------------


def format_progress(progress: Any) -> str:
    """One line from ``job.meta["progress"]`` as training jobs set it: ``{"epoch": 3, "epochs": 10,
    "stage": "train"}`` -> ``epoch 3/10 (train)``; any part may be missing; '' when there is none."""
    if not progress:
        return ""
    if not isinstance(progress, Mapping):
        return str(progress)
    parts = []
    epoch, epochs, stage = progress.get("epoch"), progress.get("epochs"), progress.get("stage")
    if epoch is not None:
        parts.append(f"epoch {epoch}/{epochs}" if epochs is not None else f"epoch {epoch}")
    if stage:
        parts.append(f"({stage})" if parts else str(stage))
    extra = {k: v for k, v in progress.items() if k not in ("epoch", "epochs", "stage")}
    parts.extend(f"{k}={v}" for k, v in extra.items())
    return " ".join(parts)


def describe_state(status: str, progress: Any) -> str:
    """``started: epoch 3/10 (train)``: a job's status and its progress, as ``--wait`` prints it."""
    text = format_progress(progress)
    return f"{status}: {text}" if text else status


def failure_reason(job: Job) -> str:
    """The last line of a failed job's traceback (``ValueError: ...``), or its status when there is none."""
    result = job.latest_result()
    exc = (getattr(result, "exc_string", None) or "").strip()
    if exc:
        return exc.splitlines()[-1]
    return f"job {job.get_status(refresh=False)}"


class WaitTimeout(TimeoutError):
    """``watch_job`` gave up before the job ended."""


def watch_job(
    job: Job,
    emit: Callable[[str], None],
    poll_s: float = 1.0,
    timeout_s: float | None = None,
) -> JobStatus:
    """Poll ``job`` until it ends, calling ``emit`` with a line (``describe_state``) each time its status or
    progress changes. Returns the final status; raises ``WaitTimeout`` after ``timeout_s`` and rq's
    ``InvalidJobOperation`` if the job disappears (expired or deleted)."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    last = None
    while True:
        status = job.get_status(refresh=True)
        meta = job.get_meta(refresh=True)
        line = describe_state(status.value, meta.get("progress"))
        if line != last:
            emit(line)
            last = line
        if status in TERMINAL:
            return status
        if deadline is not None and time.monotonic() >= deadline:
            raise WaitTimeout(f"job {job.id} still {status} after {timeout_s:g} s")
        time.sleep(poll_s)
