"""The pure parts of retraining triggers: webhook parsing, progress lines, key names, the training settings."""

from __future__ import annotations

import pytest

from config.settings import ConfigError, load_settings
from training.queue import describe_state, format_progress, redis_location
from training.trigger import WebhookCall, WebhookError, keys, parse_webhook


def test_project_id_from_project_then_annotation_then_task():
    base = {"action": "ANNOTATION_CREATED", "annotation": {"id": 1, "project": 4}, "task": {"project": 5}}
    assert parse_webhook({**base, "project": {"id": 3, "title": "x"}}).project == "3"
    assert parse_webhook(base).project == "4"
    assert parse_webhook({**base, "annotation": {"id": 1}}).project == "5"
    # An id as /predict gets it ("<id>.<created timestamp>"), or a bare number.
    assert parse_webhook({**base, "project": "12.1700000000"}).project == "12"
    assert parse_webhook({**base, "project": 7}).project == "7"
    plural = {"action": "ANNOTATIONS_CREATED", "annotation": [{"project": 9}], "task": [{"project": 8}]}
    assert parse_webhook(plural).project == "9"


@pytest.mark.parametrize(
    ("body", "want"),
    [
        ({"action": "ANNOTATION_CREATED", "project": 1, "annotation": {"was_cancelled": False}}, (1, 0)),
        ({"action": "ANNOTATION_CREATED", "project": 1, "annotation": {"was_cancelled": True}}, (0, 1)),
        ({"action": "ANNOTATION_UPDATED", "project": 1, "annotation": {"id": 3}}, (1, 0)),
        ({"action": "ANNOTATION_CREATED", "project": 1}, (1, 0)),
        (
            {
                "action": "ANNOTATIONS_CREATED",
                "project": 1,
                "annotation": [
                    {"was_cancelled": False},
                    {"was_cancelled": True},
                    {},
                    {"was_cancelled": False},
                ],
            },
            (3, 1),
        ),
        ({"action": "ANNOTATIONS_CREATED", "project": 1, "annotations": [{}, {}]}, (2, 0)),
        ({"action": "ANNOTATIONS_CREATED", "project": 1, "annotation": {"id": 1}}, (1, 0)),
        ({"action": "ANNOTATIONS_CREATED", "project": 1}, (1, 0)),
        ({"action": "ANNOTATIONS_CREATED", "project": 1, "annotation": []}, (0, 0)),
    ],
)
def test_counted_annotations_leave_skipped_tasks_out(body, want):
    call = parse_webhook(body)
    assert (call.annotations, call.skipped) == want


def test_deletions_and_other_events():
    call = parse_webhook(
        {"action": "ANNOTATIONS_DELETED", "project": {"id": 2}, "annotations": [{"id": 5}, {"id": 6}]}
    )
    assert call == WebhookCall("ANNOTATIONS_DELETED", "2", deleted_ids=(5, 6), deleted=2)
    assert parse_webhook({"action": "ANNOTATIONS_DELETED", "project": 2}).deleted == 1
    assert parse_webhook({"action": "START_TRAINING", "project": {"id": 4}}) == WebhookCall(
        "START_TRAINING", "4"
    )
    # Other events need no project and count nothing.
    for action in ("TASKS_CREATED", "PROJECT_UPDATED", "LABEL_LINK_DELETED"):
        assert parse_webhook({"action": action}) == WebhookCall(action, None)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ([], "JSON object"),
        ({"project": 1}, "action is missing"),
        ({"action": "  "}, "action is missing"),
        ({"action": 5}, "action is missing"),
        ({"action": "ANNOTATION_CREATED", "annotation": {"id": 1}}, "without a project id"),
        ({"action": "START_TRAINING"}, "without a project id"),
        ({"action": "START_TRAINING", "project": {"id": True}}, "project.id"),
        ({"action": "START_TRAINING", "project": {"id": -3}}, "project.id"),
        ({"action": "START_TRAINING", "project": "shapes"}, "project must be a project id"),
        ({"action": "ANNOTATION_CREATED", "project": 1, "annotation": [{}]}, "annotation must be an object"),
        (
            {"action": "ANNOTATIONS_CREATED", "project": 1, "annotation": "x"},
            "annotation must be an object or",
        ),
        ({"action": "ANNOTATIONS_CREATED", "project": 1, "annotation": [{}, 3]}, "annotation objects"),
        ({"action": "ANNOTATION_UPDATED", "project": 1, "annotation": {"was_cancelled": 1}}, "was_cancelled"),
        ({"action": "ANNOTATIONS_DELETED", "project": 1, "annotations": "1,2"}, "annotations must be"),
    ],
)
def test_malformed_webhooks_are_refused_with_a_reason(body, message):
    with pytest.raises(WebhookError) as e:
        parse_webhook(body)
    assert message in str(e.value)


def test_key_names():
    k = keys(5)
    assert k.new_annotations == "annoloop:5:new_annotations"
    assert k.job_state == "annoloop:5:job_state"
    assert k.followup == "annoloop:5:followup"
    assert k.paused == "annoloop:5:paused"
    assert len({*vars(k).values()}) == len(vars(k))


@pytest.mark.parametrize(
    ("progress", "line"),
    [
        ({"epoch": 3, "epochs": 10, "stage": "train"}, "epoch 3/10 (train)"),
        ({"epoch": 3}, "epoch 3"),
        ({"stage": "exporting"}, "exporting"),
        ({"epoch": 1, "epochs": 2, "stage": "val", "map50": 0.61}, "epoch 1/2 (val) map50=0.61"),
        (None, ""),
        ({}, ""),
        ("downloading images", "downloading images"),
    ],
)
def test_progress_lines(progress, line):
    assert format_progress(progress) == line


def test_state_lines():
    assert describe_state("queued", None) == "queued"
    assert (
        describe_state("started", {"epoch": 2, "epochs": 5, "stage": "train"}) == "started: epoch 2/5 (train)"
    )


def test_redis_location_hides_the_password():
    assert redis_location("redis://:s3cret@redis.local:6380/2") == "redis.local:6380/2"
    assert redis_location("redis://127.0.0.1") == "127.0.0.1:6379"


def test_training_settings_defaults_and_errors(tmp_path):
    s = load_settings({}).training
    assert s.min_new_annotations == 20
    assert s.retry_max == 3 and s.retry_intervals_s == (10, 60, 300)
    f = tmp_path / "t.yaml"
    f.write_text("training:\n  min_new_annotations: 5\n  retry_intervals_s: [1, 2]\n")
    s = load_settings({"ANNOLOOP_CONFIG": str(f)}).training
    assert s.min_new_annotations == 5 and s.retry_intervals_s == (1, 2) and s.job_timeout_s == 7200
    for bad, named in (
        ("training:\n  min_new_annotations: 0\n", "training.min_new_annotations"),
        ("training:\n  retry_intervals_s: [10, -1]\n", "training.retry_intervals_s"),
        ("training:\n  retry_intervals_s: []\n", "training.retry_intervals_s"),
        ("training:\n  retries: 2\n", "training.retries: unknown setting"),
    ):
        f.write_text(bad)
        with pytest.raises(ConfigError) as e:
            load_settings({"ANNOLOOP_CONFIG": str(f)})
        assert named in str(e.value)
