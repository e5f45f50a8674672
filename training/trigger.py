"""When to retrain: per-project annotation counters and a small job state machine in Redis.

Label Studio calls ``POST /webhook`` synchronously inside the annotator's request and gives it one second, so
the webhook only does Redis work here: one Lua script per event (atomic, so a burst of concurrent webhooks
loses no count and enqueues at most one job) and, when a training is due, one rq enqueue.

State per Label Studio project ``P`` (all keys ``annoloop:P:...``):

====================  =============================================================================
``new_annotations``   annotations created or updated since the last training started (skipped tasks
                      are not counted); reset to 0 by ``mark_started``
``deleted_annotations``  annotations deleted (counter); ``deleted_log`` keeps the latest deletions
``job_state``         ``idle`` | ``queued`` | ``running``
``job_id``            rq job id of the queued or running training job (the last one once idle)
``job_since``         unix time ``job_state`` last changed
``followup``          ``1`` (or ``force``): one more training is owed after the running one
``paused``            the reason, while automatic training is paused for the project
====================  =============================================================================

Transitions (``threshold`` is ``training.min_new_annotations``):

- an automatic trigger (annotations counted, count >= threshold, project not paused), START_TRAINING or
  ``annoloop train``: ``idle`` -> ``queued`` and one job is enqueued; ``queued``: nothing more (the queued
  job reads the annotations when it starts, so it covers these); ``running``: ``followup`` is set (once);
- the job calls ``mark_started``: -> ``running``, the counter and any ``followup`` are reset;
- the job calls ``mark_finished``: a pending ``followup`` -> ``queued`` and exactly one follow-up job is
  enqueued; otherwise -> ``idle``.

A state whose job is gone (failed for good, stopped, canceled, or finished without ``mark_finished``) does not
block the project: the next trigger sees the job's rq status and starts afresh. Nor does a job whose worker
died mid-run (SIGKILL, OOM, a lost machine): rq still calls it ``started``, but its heartbeat stops, and once
that has expired (at most ``job_monitoring_interval`` + 60 s, 90 s by default, after the worker's last beat)
every trigger first hands it to rq's own clean-up (:func:`reap_abandoned`), which re-enqueues it at once
(``training.queue.on_training_failure``) or, with no retries left, fails it, after which the trigger starts
a new job.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import redis
from rq.job import Job, JobStatus

from config.settings import TrainingSettings, load_settings
from training.queue import QUEUE_NAME, enqueue_training

log = logging.getLogger(__name__)

PREFIX = "annoloop"
# Webhook actions (Label Studio 1.23).
COUNTED_ACTIONS = frozenset({"ANNOTATION_CREATED", "ANNOTATIONS_CREATED", "ANNOTATION_UPDATED"})
DELETED_ACTION = "ANNOTATIONS_DELETED"
START_ACTION = "START_TRAINING"
# How many deletions ``deleted_log`` keeps (newest first).
DELETED_LOG_SIZE = 1000
# A queued/running state whose rq job does not exist (yet) counts as lost after this many seconds. The job
# is created a few milliseconds after the state changes, so this only matters if the enqueuer died between.
STALE_AFTER_S = 60


class WebhookError(ValueError):
    """The webhook body is malformed; the message says how (answered with 400)."""


@dataclass(frozen=True)
class ProjectKeys:
    new_annotations: str
    deleted_annotations: str
    deleted_log: str
    job_state: str
    job_id: str
    job_since: str
    followup: str
    paused: str


def keys(project: str | int) -> ProjectKeys:
    """The Redis keys of one project's trigger state."""
    p = f"{PREFIX}:{project}:"
    return ProjectKeys(*(p + name for name in ProjectKeys.__dataclass_fields__))


# --- Lua: each runs atomically in Redis, so concurrent callers see each other's writes in order ----------

# KEYS: new_annotations, job_state, followup, paused, job_id, job_since
# ARGV: increment, threshold (0: due now), ignore_pause (0/1), force (0/1), new job id, now, stale_after_s,
#       rq job key prefix
# Returns {outcome, count, job id or pause reason, force}; outcome: counted | paused | enqueue | coalesced |
# followup. "enqueue" means: the caller must enqueue a job with the given id now.
_TRIGGER = """
local count = redis.call('INCRBY', KEYS[1], ARGV[1])
local threshold = tonumber(ARGV[2])
if threshold > 0 and count < threshold then
  return {'counted', count, '', '0'}
end
if ARGV[3] ~= '1' then
  local reason = redis.call('GET', KEYS[4])
  if reason then return {'paused', count, reason, '0'} end
end
local state = redis.call('GET', KEYS[2]) or 'idle'
local job = redis.call('GET', KEYS[5]) or ''
if state ~= 'idle' then
  local status = false
  if job ~= '' then status = redis.call('HGET', ARGV[8] .. job, 'status') end
  if status == 'finished' or status == 'failed' or status == 'stopped' or status == 'canceled' then
    state = 'idle'
  elseif not status then
    local since = tonumber(redis.call('GET', KEYS[6]) or '0')
    if tonumber(ARGV[6]) - since > tonumber(ARGV[7]) then state = 'idle' end
  end
end
if state == 'idle' then
  local force = ARGV[4]
  if redis.call('GET', KEYS[3]) == 'force' then force = '1' end
  redis.call('DEL', KEYS[3])
  redis.call('SET', KEYS[2], 'queued')
  redis.call('SET', KEYS[5], ARGV[5])
  redis.call('SET', KEYS[6], ARGV[6])
  return {'enqueue', count, ARGV[5], force}
end
if state == 'queued' then
  return {'coalesced', count, job, '0'}
end
if ARGV[4] == '1' then
  redis.call('SET', KEYS[3], 'force')
elseif not redis.call('GET', KEYS[3]) then
  redis.call('SET', KEYS[3], '1')
end
return {'followup', count, job, '0'}
"""

# KEYS: job_state, job_id, job_since, followup; ARGV: the job id we set, followup value to restore ('' none)
_ROLLBACK = """
if redis.call('GET', KEYS[2]) == ARGV[1] and redis.call('GET', KEYS[1]) == 'queued' then
  redis.call('SET', KEYS[1], 'idle')
  if ARGV[2] ~= '' then redis.call('SET', KEYS[4], ARGV[2]) end
  return 1
end
return 0
"""

# KEYS: new_annotations, job_state, followup, job_id, job_since; ARGV: job id ('' unknown), now
_STARTED = """
local n = tonumber(redis.call('GET', KEYS[1]) or '0')
redis.call('SET', KEYS[1], 0)
redis.call('DEL', KEYS[3])
redis.call('SET', KEYS[2], 'running')
if ARGV[1] ~= '' then redis.call('SET', KEYS[4], ARGV[1]) end
redis.call('SET', KEYS[5], ARGV[2])
return n
"""

# KEYS: job_state, followup, paused, job_id, job_since; ARGV: caller's job id ('' unknown), new job id, now
# Returns {outcome, job id, force}; outcome: enqueue | idle | not_current.
_FINISHED = """
local current = redis.call('GET', KEYS[4]) or ''
if ARGV[1] ~= '' and current ~= '' and ARGV[1] ~= current then
  return {'not_current', current, '0'}
end
local f = redis.call('GET', KEYS[2])
redis.call('DEL', KEYS[2])
if f and (f == 'force' or not redis.call('GET', KEYS[3])) then
  redis.call('SET', KEYS[1], 'queued')
  redis.call('SET', KEYS[4], ARGV[2])
  redis.call('SET', KEYS[5], ARGV[3])
  if f == 'force' then return {'enqueue', ARGV[2], '1'} end
  return {'enqueue', ARGV[2], '0'}
end
redis.call('SET', KEYS[1], 'idle')
redis.call('SET', KEYS[5], ARGV[3])
return {'idle', current, '0'}
"""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _new_job_id(project: str) -> str:
    return f"train-{project}-{uuid.uuid4().hex[:12]}"


def _settings(settings: TrainingSettings | None) -> TrainingSettings:
    return settings if settings is not None else load_settings().training


@dataclass(frozen=True)
class Outcome:
    """What a webhook or a training request did.

    status: ignored | skipped (only skipped tasks) | counted | recorded (deletions) | paused (counted, not
    enqueued) | enqueued | coalesced (a job is queued already) | followup (one runs after the running job)
    """

    status: str
    project: str | None = None
    new_annotations: int | None = None
    job_id: str | None = None
    paused: str | None = None
    deleted_annotations: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


# --- Triggering ------------------------------------------------------------------------------------


def reap_abandoned(r: redis.Redis, project: str | int) -> bool:
    """If the project's queued or running job is one rq calls ``started`` but whose heartbeat has expired
    (its worker died), let rq clean it up now rather than at some worker's next maintenance (every 10
    minutes by default): rq retries it (at once, see ``training.queue.on_training_failure``) or fails it.
    Returns whether it did. Costs one or two Redis reads when nothing is stuck, so every trigger calls it.
    """
    k = keys(project)
    state, job_id = r.mget([k.job_state, k.job_id])
    if state is None or job_id is None or _text(state) not in ("queued", "running"):
        return False
    jid = _text(job_id)
    status = r.hget(Job.redis_job_namespace_prefix + jid, "status")
    if status is None or _text(status) != JobStatus.STARTED.value:
        return False
    from rq.registry import StartedJobRegistry
    from rq.timeouts import TimerDeathPenalty

    # A thread-based timeout for the failure callback: webhooks run in the server's worker threads, where
    # rq's default (SIGALRM) cannot be used.
    registry = StartedJobRegistry(QUEUE_NAME, connection=r, death_penalty_class=TimerDeathPenalty)
    if jid not in registry.get_expired_job_ids():
        return False
    try:
        registry.cleanup()
    except redis.RedisError:
        raise
    except Exception:  # rq's clean-up failing must not fail the webhook; a worker's maintenance retries it
        log.warning(
            "could not clean up an abandoned job",
            extra={"project": str(project), "job_id": jid},
            exc_info=True,
        )
        return False
    after = r.hget(Job.redis_job_namespace_prefix + jid, "status")
    log.warning(
        "abandoned training job cleaned up",
        extra={"project": str(project), "job_id": jid, "status": _text(after) if after else None},
    )
    return True


def _trigger(
    r: redis.Redis,
    project: str,
    *,
    increment: int,
    threshold: int,
    ignore_pause: bool,
    force: bool,
    reason: str,
    settings: TrainingSettings,
) -> Outcome:
    reap_abandoned(r, project)
    k = keys(project)
    job_id = _new_job_id(project)
    script = r.register_script(_TRIGGER)
    outcome, count, ref, forced = script(
        keys=[k.new_annotations, k.job_state, k.followup, k.paused, k.job_id, k.job_since],
        args=[
            increment,
            threshold,
            int(ignore_pause),
            int(force),
            job_id,
            int(time.time()),
            STALE_AFTER_S,
            Job.redis_job_namespace_prefix,
        ],
    )
    outcome, ref, count = _text(outcome), _text(ref), int(count)
    if outcome == "paused":
        return Outcome("paused", project, count, paused=ref)
    if outcome == "enqueue":
        _enqueue(r, project, job_id, _text(forced) == "1", reason, settings, count, restore_followup="")
        return Outcome("enqueued", project, count, job_id=job_id)
    return Outcome(outcome, project, count, job_id=ref or None)


def _enqueue(
    r: redis.Redis,
    project: str,
    job_id: str,
    force: bool,
    reason: str,
    settings: TrainingSettings,
    count: int | None,
    restore_followup: str,
) -> None:
    """Enqueue the job the state machine just recorded; if that fails, put the state back and re-raise."""
    try:
        enqueue_training(
            r,
            project,
            force=force,
            job_id=job_id,
            reason=reason,
            settings=settings,
            meta={"new_annotations": count} if count is not None else None,
        )
    except Exception:
        k = keys(project)
        try:
            r.register_script(_ROLLBACK)(
                keys=[k.job_state, k.job_id, k.job_since, k.followup], args=[job_id, restore_followup]
            )
        except redis.RedisError:
            log.warning("could not roll back the trigger state", extra={"project": project, "job_id": job_id})
        raise


def count_annotations(
    r: redis.Redis, project: str | int, n: int = 1, settings: TrainingSettings | None = None
) -> Outcome:
    """Count ``n`` new or changed annotations; enqueue a training when the count reaches the threshold
    (unless the project is paused or a job is queued; while one runs, a follow-up is owed instead)."""
    s = _settings(settings)
    return _trigger(
        r,
        str(project),
        increment=n,
        threshold=s.min_new_annotations,
        ignore_pause=False,
        force=False,
        reason="annotations",
        settings=s,
    )


def request_training(
    r: redis.Redis,
    project: str | int,
    *,
    force: bool = False,
    reason: str = "manual",
    settings: TrainingSettings | None = None,
) -> Outcome:
    """Ask for a training now, whatever the count (START_TRAINING, ``annoloop train``). Coalesces like the
    automatic trigger: joins a queued job, or owes one follow-up after a running one. A paused project is
    trained only with ``force`` (which is also passed on to the job)."""
    s = _settings(settings)
    return _trigger(
        r,
        str(project),
        increment=0,
        threshold=0,
        ignore_pause=force,
        force=force,
        reason=reason,
        settings=s,
    )


def record_deleted(r: redis.Redis, project: str | int, ids: list[Any], n: int | None = None) -> int:
    """Record deleted annotations (counter and a capped log); they do not start a training. Returns the
    project's deletion count."""
    k = keys(project)
    n = len(ids) if n is None else n
    entry = json.dumps({"at": round(time.time(), 3), "count": n, "ids": ids[:100]})
    with r.pipeline(transaction=True) as pipe:
        pipe.incrby(k.deleted_annotations, n)
        pipe.lpush(k.deleted_log, entry)
        pipe.ltrim(k.deleted_log, 0, DELETED_LOG_SIZE - 1)
        total, _, _ = pipe.execute()
    return int(total)


# --- Called by the training job ----------------------------------------------------------------------


def _current_job_id() -> str:
    from rq import get_current_job

    job = get_current_job()
    return job.id if job is not None else ""


def mark_started(r: redis.Redis, project: str | int, job_id: str | None = None) -> int:
    """Call first thing in the training job, before reading annotations from Label Studio.

    Marks the project ``running`` under this job (``job_id``, default: the current rq job) and resets its
    new-annotation counter: what was counted until now is in this training; annotations arriving while it
    runs count towards the next one, and once they reach the threshold one follow-up is owed. Returns the
    count it reset (the annotations this training was triggered for).
    """
    k = keys(project)
    jid = job_id if job_id is not None else _current_job_id()
    n = r.register_script(_STARTED)(
        keys=[k.new_annotations, k.job_state, k.followup, k.job_id, k.job_since],
        args=[jid, int(time.time())],
    )
    log.info("training started", extra={"project": str(project), "job_id": jid or None, "new_annotations": n})
    return int(n)


def mark_finished(
    r: redis.Redis,
    project: str | int,
    job_id: str | None = None,
    settings: TrainingSettings | None = None,
) -> bool:
    """Call last in the training job once it succeeded (not in a ``finally``: a failed job is retried by rq,
    and one that fails for good does not block the project: the next trigger sees its rq status).

    If triggers arrived while it ran, enqueues exactly one follow-up job (project -> ``queued``) and returns
    True; otherwise marks the project ``idle`` and returns False. A job that is no longer the project's
    current one (``job_id``, default: the current rq job) changes nothing and returns False.
    """
    project = str(project)
    k = keys(project)
    jid = job_id if job_id is not None else _current_job_id()
    new_id = _new_job_id(project)
    outcome, ref, forced = r.register_script(_FINISHED)(
        keys=[k.job_state, k.followup, k.paused, k.job_id, k.job_since],
        args=[jid, new_id, int(time.time())],
    )
    outcome, forced = _text(outcome), _text(forced) == "1"
    if outcome == "not_current":
        log.warning(
            "finished job is not the project's current one: state left alone",
            extra={"project": project, "job_id": jid, "current_job_id": _text(ref)},
        )
        return False
    if outcome == "idle":
        log.info("training finished", extra={"project": project, "job_id": jid or None, "followup": False})
        return False
    s = _settings(settings)
    _enqueue(r, project, new_id, forced, "followup", s, None, restore_followup="force" if forced else "1")
    log.info(
        "training finished",
        extra={"project": project, "job_id": jid or None, "followup": True, "followup_job_id": new_id},
    )
    return True


# --- Pausing -----------------------------------------------------------------------------------------


def is_paused(r: redis.Redis, project: str | int) -> str | None:
    """The reason automatic training is paused for the project, or None when it is not."""
    value = r.get(keys(project).paused)
    return None if value is None else _text(value)


def pause(r: redis.Redis, project: str | int, reason: str) -> None:
    """Pause automatic training: annotations are still counted but start nothing. START_TRAINING and
    ``annoloop train --force`` still train."""
    r.set(keys(project).paused, reason.strip() or "paused")
    log.info("training paused", extra={"project": str(project), "reason": reason})


def resume(r: redis.Redis, project: str | int) -> bool:
    """Resume automatic training; the next counted annotation starts one if the count is over the threshold.
    Returns whether the project was paused."""
    was = bool(r.delete(keys(project).paused))
    log.info("training resumed", extra={"project": str(project), "was_paused": was})
    return was


def project_state(r: redis.Redis, project: str | int) -> dict[str, Any]:
    """The project's trigger state as plain values (for the CLI, logs and tests)."""
    k = keys(project)
    values = r.mget(
        [k.job_state, k.job_id, k.new_annotations, k.followup, k.paused, k.deleted_annotations, k.job_since]
    )
    state, job_id, new, followup, paused, deleted, since = (None if v is None else _text(v) for v in values)
    return {
        "state": state or "idle",
        "job_id": job_id,
        "new_annotations": int(new or 0),
        "followup": followup,
        "paused": paused,
        "deleted_annotations": int(deleted or 0),
        "since": int(since) if since else None,
    }


# --- Webhooks ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WebhookCall:
    """A webhook body reduced to what triggering needs."""

    action: str
    project: str | None
    annotations: int = 0  # counted annotations (skipped tasks excluded)
    skipped: int = 0
    deleted_ids: tuple[Any, ...] = ()
    deleted: int = 0


def _project_id(value: Any, where: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, Mapping):
        return _project_id(value.get("id"), where + ".id")
    if isinstance(value, bool):
        raise WebhookError(f"invalid webhook: {where} must be a project id")
    if isinstance(value, int):
        if value < 0:
            raise WebhookError(f"invalid webhook: {where} must be a project id")
        return str(value)
    if isinstance(value, str):
        head = value.split(".", 1)[0].strip()  # "<id>.<created timestamp>" as /predict gets it
        if head.isdigit():
            return str(int(head))
    raise WebhookError(f"invalid webhook: {where} must be a project id, got {value!r:.40}")


def _first(value: Any) -> Any:
    if isinstance(value, list):
        return value[0] if value else None
    return value


def _webhook_project(body: Mapping[str, Any]) -> str | None:
    project = _project_id(body.get("project"), "project")
    if project is None:
        ann = _first(body.get("annotation"))
        if isinstance(ann, Mapping):
            project = _project_id(ann.get("project"), "annotation.project")
    if project is None:
        task = _first(body.get("task"))
        if isinstance(task, Mapping):
            project = _project_id(task.get("project"), "task.project")
    return project


def _annotation_list(body: Mapping[str, Any], *names: str) -> list[Any] | None:
    for name in names:
        if name in body and body[name] is not None:
            value = body[name]
            if isinstance(value, Mapping):
                return [value]
            if not isinstance(value, list):
                raise WebhookError(f"invalid webhook: {name} must be an object or a list of objects")
            for item in value:
                if not isinstance(item, Mapping):
                    raise WebhookError(f"invalid webhook: {name} must hold annotation objects")
            return value
    return None


def _cancelled(annotation: Mapping[str, Any], where: str) -> bool:
    value = annotation.get("was_cancelled")
    if value is None:
        return False
    if not isinstance(value, bool):
        raise WebhookError(f"invalid webhook: {where}.was_cancelled must be true or false")
    return value


def parse_webhook(body: Any) -> WebhookCall:
    """Reduce a Label Studio webhook body to a ``WebhookCall``; raise ``WebhookError`` if it is malformed."""
    if not isinstance(body, Mapping):
        raise WebhookError("invalid webhook: body must be a JSON object with an 'action'")
    action = body.get("action")
    if not isinstance(action, str) or not action.strip():
        raise WebhookError("invalid webhook: action is missing")
    relevant = action in COUNTED_ACTIONS or action in (DELETED_ACTION, START_ACTION)
    if not relevant:
        return WebhookCall(action, None)
    project = _webhook_project(body)
    if project is None:
        raise WebhookError(
            f"invalid webhook: {action} without a project id (project.id, annotation.project or task.project)"
        )
    if action == START_ACTION:
        return WebhookCall(action, project)
    if action == DELETED_ACTION:
        items = _annotation_list(body, "annotations", "annotation")
        ids = tuple(item.get("id") for item in items) if items is not None else ()
        return WebhookCall(action, project, deleted_ids=ids, deleted=len(items) if items is not None else 1)
    if action == "ANNOTATIONS_CREATED":
        items = _annotation_list(body, "annotation", "annotations")
    else:
        ann = body.get("annotation")
        if ann is not None and not isinstance(ann, Mapping):
            raise WebhookError("invalid webhook: annotation must be an object")
        items = [ann] if ann is not None else None
    if items is None:  # no annotation in the payload: count the event as one
        return WebhookCall(action, project, annotations=1)
    skipped = sum(_cancelled(a, "annotation") for a in items)
    return WebhookCall(action, project, annotations=len(items) - skipped, skipped=skipped)


def handle_webhook(r: redis.Redis, call: WebhookCall, settings: TrainingSettings | None = None) -> Outcome:
    """Apply a parsed webhook to the project's state (Redis only; raises ``redis.RedisError``)."""
    if call.project is None:
        return Outcome("ignored")
    if call.action == START_ACTION:
        # A person pressed "Start Training": train now, paused or not.
        return request_training(r, call.project, force=True, reason="start_training", settings=settings)
    if call.action == DELETED_ACTION:
        total = record_deleted(r, call.project, list(call.deleted_ids), n=call.deleted)
        return Outcome("recorded", call.project, deleted_annotations=total)
    if call.annotations == 0:
        return Outcome("skipped", call.project)
    return count_annotations(r, call.project, call.annotations, settings)
