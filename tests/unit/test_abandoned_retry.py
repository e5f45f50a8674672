"""The failure callback of training jobs: a job abandoned by a dead worker is retried at once, once; other
failures keep the configured backoff."""

from __future__ import annotations

import pytest
import redis
from rq.exceptions import AbandonedJobError
from rq.job import Job

from training.queue import on_training_failure


def job(retries_left: int, intervals: list[int]) -> Job:
    j = Job.create("training.jobs.train_project", args=("7",), connection=redis.Redis(port=1))  # never used
    j.retries_left, j.retry_intervals = retries_left, list(intervals)
    return j


@pytest.mark.parametrize(
    ("left", "intervals", "after"),
    [
        (3, [10, 60, 300], [0, 60, 300]),  # the first retry is now immediate ...
        (2, [10, 60, 300], [10, 0, 300]),  # ... or the second, when one was used already
        (5, [10, 60], [0, 10, 10, 10, 60]),  # more retries than values: rq's first-value rule, spelled out
    ],
)
def test_an_abandoned_job_is_retried_at_once_and_later_retries_keep_the_backoff(left, intervals, after):
    j = job(left, intervals)
    before = [job(n, intervals).get_retry_interval() for n in range(left - 1, 0, -1)]
    on_training_failure(j, j.connection, AbandonedJobError, AbandonedJobError(), None)
    assert j.retry_intervals == after
    assert j.get_retry_interval() == 0
    later = []
    for n in range(left - 1, 0, -1):
        j.retries_left = n
        later.append(j.get_retry_interval())
    assert later == before


def test_other_failures_and_exhausted_jobs_are_left_alone():
    j = job(3, [10, 60, 300])
    on_training_failure(j, j.connection, RuntimeError, RuntimeError("Label Studio down"), None)
    assert j.retry_intervals == [10, 60, 300] and j.get_retry_interval() == 10
    done = job(0, [10])
    on_training_failure(done, done.connection, AbandonedJobError, AbandonedJobError(), None)
    assert done.retry_intervals == [10] and done.retries_left == 0
