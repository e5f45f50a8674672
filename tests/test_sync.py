"""`annoloop sync` against a real Label Studio 1.23.2: the queue it orders is the queue Label Studio serves.

Every assertion reads Label Studio's side (``/next``, the project, its prediction versions), not only the
sync's summary. The tests of this module run in order on one project, as an admin would sync it over time.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from config.settings import Settings
from sync.job import OURS, sync_project
from sync.labelstudio_io import SyncError
from tests.conftest import VENV_BIN, gt_result, publish, shapes_project

pytestmark = pytest.mark.labelstudio


def _settings(ls, model_dir: Path, **sync) -> Settings:
    return Settings(
        label_studio={"url": ls.url, "api_key": ls.token},
        model_dir=model_dir,
        log_level="WARNING",
        sync={"batch_size": 8, "page_size": 10, "import_chunk": 7, **sync},
    )


def _next_task(ls, project: int) -> int:
    return int(ls.api("GET", f"/api/projects/{project}/next").json()["id"])


def _versions(ls, project: int) -> dict[str, int]:
    return ls.api("GET", f"/api/projects/{project}/model-versions/").json()


@pytest.fixture(scope="module")
def world(label_studio, tmp_path_factory, starter_weights):
    """A shapes project with a missing and a corrupt image, a foreign prediction, and a served model."""
    ls = label_studio
    work = tmp_path_factory.mktemp("sync")
    model_dir = work / "models"
    publish(model_dir, starter_weights("detect"), "starter")
    project, ids, shapes = shapes_project(ls, "sync-shapes", 24, seed=11, title="sync ordering")
    (ls.files_root / "sync-shapes" / "corrupt.png").write_bytes(b"this is not a png")
    bad = ls.import_tasks(
        project,
        [
            {"image": ls.local_file_url("sync-shapes/missing.png")},
            {"image": ls.local_file_url("sync-shapes/corrupt.png")},
        ],
    )
    foreign = {"task": ids[0], "model_version": "someone-else", "score": 0.5, "result": []}
    ls.api("POST", f"/api/projects/{project}/import/predictions", json=[foreign])
    return {
        "ls": ls,
        "project": project,
        "ids": ids,
        "bad": bad,
        "shapes": shapes,
        "settings": _settings(ls, model_dir),
        "work": work,
    }


def test_first_sync_orders_the_queue_label_studio_serves(world):
    ls, project, settings = world["ls"], world["project"], world["settings"]
    summary = sync_project(project, settings, plot=world["work"] / "plot.png")
    world["first"] = summary

    assert summary.model_version == "starter" and not summary.cold_start and summary.model_loaded
    assert summary.pool == 24 and summary.labeled == 0
    assert set(summary.failed) == set(world["bad"])  # reported and skipped; the sync finished
    assert all(summary.failed.values())
    assert summary.scored == 24 and summary.from_cache == 0
    assert summary.written == 24
    assert OURS.match(summary.sync_version) and summary.sync_version.startswith("starter@")
    # Label Studio side: uncertainty sampling on the sync's version, and /next serves the ranking's first.
    info = ls.project(project)
    assert info["model_version"] == summary.sync_version
    assert info["sampling"] == "Uncertainty sampling"
    assert _next_task(ls, project) == summary.top[0]["task"]
    versions = _versions(ls, project)
    assert versions[summary.sync_version] == 24
    assert versions["someone-else"] == 1  # other predictions are never touched
    scores = sorted(
        p["score"]
        for t in ls.tasks(project)
        for p in ls.predictions(t["id"])
        if p["model_version"] == summary.sync_version
    )
    assert scores[0] == 0.0 and scores[-1] == 1.0 and len(scores) == 24
    views = ls.api("GET", "/api/dm/views", params={"project": project}).json()
    mine = [v for v in views if v["data"].get("title") == settings.sync.view_title]
    assert len(mine) == 1 and mine[0]["data"]["ordering"] == ["tasks:predictions_score"]
    assert Path(summary.plot).stat().st_size > 10_000


def test_two_annotators_get_two_different_tasks(world):
    ls, project = world["ls"], world["project"]
    other = ls.add_user("second.annotator@example.com")
    try:
        first = _next_task(ls, project)
        second = int(other.api("GET", f"/api/projects/{project}/next").json()["id"])
    finally:
        other.stop()
    assert first != second  # the first annotator's lock keeps the second off that task
    world["locked_by_second"] = second
    ranked = {t["task"] for t in world["first"].top}
    assert first in ranked and second in ranked  # both from the head of the ranking, not random tasks


def test_resync_with_nothing_new_skips_inference_and_writes_nothing(world):
    ls, project, settings = world["ls"], world["project"], world["settings"]
    before = _versions(ls, project)
    summary = sync_project(project, settings)
    assert summary.scored == 0 and summary.from_cache == 24
    assert not summary.model_loaded  # not even the weights were loaded
    assert summary.unchanged and summary.written == 0
    assert summary.sync_version == world["first"].sync_version
    assert _versions(ls, project) == before
    # The failing tasks are retried each time (their images may come back), but cost no model call.
    assert set(summary.failed) == set(world["bad"])
    # Pages and calls, not tasks: a handful of reads, no import.
    assert summary.api_calls < 15


def test_a_reset_model_version_is_set_back(world):
    """Connecting a backend resets the project's model version to the backend's title; the sync fixes it."""
    ls, project, settings = world["ls"], world["project"], world["settings"]
    ls.api("PATCH", f"/api/projects/{project}", json={"model_version": "someone-else"})
    summary = sync_project(project, settings)
    assert summary.unchanged and summary.fixed_project_settings
    assert ls.project(project)["model_version"] == world["first"].sync_version


def test_a_task_labeled_in_between_drops_out_and_the_queue_moves_on(world):
    ls, project, settings = world["ls"], world["project"], world["settings"]
    top = world["first"].top[0]["task"]
    index = world["ids"].index(top)
    ls.api("POST", f"/api/tasks/{top}/annotations", json={"result": gt_result(world["shapes"][index])})
    summary = sync_project(project, settings)
    assert summary.labeled == 1 and summary.pool == 23
    assert summary.scored == 0 and summary.from_cache == 24  # the labeled task's embedding is cached too
    assert not summary.unchanged and summary.written == 23
    assert top not in {t["task"] for t in summary.top}
    # The first task of the new ranking that the second annotator does not hold (Label Studio's task lock).
    expected = next(t["task"] for t in summary.top if t["task"] != world["locked_by_second"])
    assert _next_task(ls, project) == expected
    versions = _versions(ls, project)
    assert versions.get(summary.sync_version) == 23
    # The previous annoloop version is gone; the foreign one stays.
    assert world["first"].sync_version not in versions and versions["someone-else"] == 1
    assert summary.deleted_versions == [world["first"].sync_version]
    world["third"] = summary


def test_dry_run_writes_nothing(world):
    ls, project, settings = world["ls"], world["project"], world["settings"]
    before, info = _versions(ls, project), ls.project(project)
    # A new task makes a write due, so "nothing written" is the dry run's doing.
    path = ls.files_root / "sync-shapes" / "extra.png"
    Image.fromarray(np.full((240, 320, 3), 90, np.uint8)).save(path)
    ls.import_tasks(project, [{"image": ls.local_file_url("sync-shapes/extra.png")}])
    summary = sync_project(project, settings, dry_run=True, top=30)
    assert summary.dry_run and summary.pool == 24 and summary.written == 0 and summary.scored == 1
    assert len(summary.top) == 24
    assert _versions(ls, project) == before
    assert ls.project(project)["model_version"] == info["model_version"]


def test_cold_start_ranks_by_diversity(label_studio, tmp_path):
    """No model at all: cheap image features, and near-duplicates are not queued together."""
    ls = label_studio
    folder = ls.files_root / "cold"
    folder.mkdir()
    rng = np.random.default_rng(3)
    urls = []
    for g in range(5):  # five looks, four near-copies of each
        base = rng.integers(0, 255, (8, 8, 3)).astype(np.uint8)
        big = np.kron(base, np.ones((30, 40, 1), np.uint8))
        for c in range(4):
            noisy = np.clip(big.astype(int) + rng.integers(-4, 5, big.shape), 0, 255).astype(np.uint8)
            Image.fromarray(noisy).save(folder / f"{g}-{c}.png")
            urls.append((g, ls.local_file_url(f"cold/{g}-{c}.png")))
    from tests.conftest import SHAPES_CONFIG

    project = ls.create_project("cold start", SHAPES_CONFIG)
    ls.add_local_storage(project, "cold")
    ids = ls.import_tasks(project, [{"image": u} for _, u in urls])
    group = {task: g for task, (g, _) in zip(ids, urls, strict=True)}
    settings = _settings(ls, tmp_path / "no-models", ranking={"exploration_fraction": 0.0, "batch_size": 5})
    summary = sync_project(project, settings, top=5)
    assert summary.cold_start and summary.sync_version.startswith("cold-start@")
    assert summary.written == 20
    assert sorted(group[t["task"]] for t in summary.top) == [0, 1, 2, 3, 4]
    assert ls.project(project)["model_version"] == summary.sync_version
    assert _next_task(ls, project) == summary.top[0]["task"]


def test_errors_are_one_line_and_exit_non_zero(world, tmp_path):
    ls = world["ls"]
    base = {**os.environ, "MODEL_DIR": str(tmp_path / "m"), "LOG_LEVEL": "ERROR"}

    def run(*args: str, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(VENV_BIN / "annoloop"), "sync", *args],
            env={**base, **env},
            capture_output=True,
            text=True,
            timeout=120,
        )

    cases = {
        "does not exist": run("--project", "99999", LABEL_STUDIO_URL=ls.url, LABEL_STUDIO_API_KEY=ls.token),
        "refused the API key": run(
            "--project", str(world["project"]), LABEL_STUDIO_URL=ls.url, LABEL_STUDIO_API_KEY="0" * 40
        ),
        "unreachable": run(
            "--project",
            str(world["project"]),
            LABEL_STUDIO_URL="http://127.0.0.1:9",
            LABEL_STUDIO_API_KEY="x" * 40,
        ),
    }
    for expected, done in cases.items():
        assert done.returncode == 1, done.stderr
        lines = [line for line in done.stderr.splitlines() if line.startswith("annoloop sync:")]
        assert len(lines) == 1 and expected in lines[0], done.stderr
        assert "Traceback" not in done.stderr


def test_cli_sync_prints_ranking_and_summary(world):
    ls = world["ls"]
    done = subprocess.run(
        [str(VENV_BIN / "annoloop"), "sync", "--project", str(world["project"]), "--dry-run", "--top", "3"],
        env={
            **os.environ,
            "MODEL_DIR": str(world["settings"].model_dir),
            "LABEL_STUDIO_URL": ls.url,
            "LABEL_STUDIO_API_KEY": ls.token,
            "LOG_LEVEL": "ERROR",
        },
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "dry run, nothing written" in done.stdout
    assert "next to label" in done.stdout
    assert "unlabeled tasks scored" in done.stderr  # progress


def test_sync_errors_raise_sync_error_in_process(world):
    settings = _settings(world["ls"], world["settings"].model_dir)
    with pytest.raises(SyncError, match="does not exist"):
        sync_project(123456, settings)


def test_scheduled_sync_repeats_until_stopped(world):
    """`annoloop sync --every` syncs on each tick and stops cleanly on SIGTERM (as `docker stop` sends)."""
    import signal
    import time

    ls = world["ls"]
    proc = subprocess.Popen(
        [str(VENV_BIN / "annoloop"), "sync", "--project", str(world["project"]), "--every", "1s", "--quiet"],
        env={
            **os.environ,
            "MODEL_DIR": str(world["settings"].model_dir),
            "LABEL_STUDIO_URL": ls.url,
            "LABEL_STUDIO_API_KEY": ls.token,
            "LOG_LEVEL": "ERROR",
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    rounds = 0
    deadline = time.monotonic() + 240
    try:
        while rounds < 2 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            rounds += line.startswith(f"project {world['project']}: ranked")
    finally:
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=60)
    assert rounds == 2, err
    assert proc.returncode == 0, err
    assert "stopped" in err and "Traceback" not in err
