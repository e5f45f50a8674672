"""The sync as an RQ job, so the training worker can re-rank a project right after promoting a version.

Its own queue ("sync") keeps a long sync from delaying a training job's place, while `annoloop worker`
serves both. The job id is per project and version: promoting the same version twice enqueues one sync.
"""

from __future__ import annotations

import logging
from typing import Any

import redis
from rq import Queue
from rq.job import Job

log = logging.getLogger(__name__)

QUEUE_NAME = "sync"
JOB_FUNC = "sync.queue.run_sync_job"


def sync_queue(conn: redis.Redis) -> Queue:
    return Queue(QUEUE_NAME, connection=conn, default_timeout=3600)


def enqueue_sync(conn: redis.Redis, project: str, reason: str) -> Job:
    job_id = f"annoloop-sync-{project}-{reason}".replace("/", "_")
    existing = Job.fetch(job_id, connection=conn) if Job.exists(job_id, connection=conn) else None
    if existing is not None and existing.get_status(refresh=False) in ("queued", "started", "deferred"):
        return existing
    return sync_queue(conn).enqueue(
        JOB_FUNC,
        project,
        job_id=job_id,
        result_ttl=7 * 24 * 3600,
        failure_ttl=30 * 24 * 3600,
        description=f"sync project {project} ({reason})",
    )


def run_sync_job(project: str) -> dict[str, Any]:
    """Queue entry point: one sync with the worker's settings; the summary is the job's result."""
    from sync.job import sync_project

    summary = sync_project(project)
    return summary.to_dict()
