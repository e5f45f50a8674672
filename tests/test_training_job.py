"""The retraining job against a real Label Studio 1.23.2, with real (tiny) ultralytics training.

One project of generated shapes, annotated through Label Studio's API like annotators would, with the
awkward cases mixed in: a negative image, boxes out of the image, an unknown label, a relabel, a skip, a
broken image. Training is tiny (imgsz 128, a few epochs) so the whole module stays within a few minutes
on a 2-core CPU.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from annoloop.images import ImageFetcher
from annoloop.labelstudio import LabelStudioAccess
from annoloop.model_store import DEFAULT_PROJECT, ModelStore
from config.settings import Settings, TrainingSettings, load_settings
from tests.conftest import REPO, free_port, publish
from training.dataset import ImageCache, build_dataset, split_of
from training.export import LabelStudioUnavailable, ProjectNotFound, export_project
from training.fit import plan_run, train_args
from training.jobs import REJECTED_DIR, InvalidProject, decide, run_training
from training.synthetic import render_scene

SHAPES_CONFIG = """<View><Image name="image" value="$image"/>
<RectangleLabels name="label" toName="image">
  <Label value="Circle"/><Label value="Square"/><Label value="Triangle"/>
</RectangleLabels></View>"""
LABELS = ("Circle", "Square", "Triangle")
W, H = 160, 120

#: Tiny but real: a few epochs at 128 px on ~25 images, a couple of seconds per epoch on one CPU thread.
TINY_TRAINING = {
    "imgsz": 128,
    "batch": 8,
    "base_epochs": 3,
    "finetune_epochs": 2,
    "workers": 0,
    "holdout_fraction": 0.25,
    "train_args": {"nbs": 8, "close_mosaic": 1},
}
_VERSION = re.compile(r"^v\d{3,}-\d{8}T\d{6}Z$")


def region(box, label, w=W, h=H, **value):
    x0, y0, x1, y1 = box
    v = {"x": 100 * x0 / w, "y": 100 * y0 / h, "width": 100 * (x1 - x0) / w, "height": 100 * (y1 - y0) / h}
    v.update(value)
    return {
        "from_name": "label",
        "to_name": "image",
        "type": "rectanglelabels",
        "original_width": w,
        "original_height": h,
        "image_rotation": 0,
        "value": {"rotation": 0, **v, "rectanglelabels": [label]},
    }


@dataclass
class ShapesProject:
    id: int
    labeled: list[int] = field(default_factory=list)  # tasks with a non-cancelled annotation
    negative: int = 0
    bad_boxes: int = 0
    relabeled: int = 0
    broken: int = 0
    cancelled: int = 0
    unlabeled: int = 0
    expected_lines: dict[int, list[str]] = field(default_factory=dict)


@pytest.fixture(scope="module")
def shapes_project(label_studio) -> ShapesProject:
    ls = label_studio
    folder = ls.files_root / "training-job"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(11)
    project = ShapesProject(ls.create_project("annoloop retrain", SHAPES_CONFIG))
    names, scenes = [], []
    for i in range(28):
        rgb, shapes = render_scene(rng, W, H, max_shapes=3)
        Image.fromarray(rgb).save(folder / f"s{i}.png")
        names.append(f"s{i}.png")
        scenes.append(shapes)
    Image.fromarray(np.full((H, W, 3), 128, np.uint8)).save(folder / "empty.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    names += ["empty.png", "broken.png", "s0.png", "s1.png"]  # the last two: a skipped and an unlabeled task
    ls.add_local_storage(project.id, "training-job")
    ids = ls.import_tasks(project.id, [{"image": ls.local_file_url(f"training-job/{n}")} for n in names])

    def annotate(task_id: int, result: list, cancelled: bool = False) -> None:
        ls.api(
            "POST",
            f"/api/tasks/{task_id}/annotations/",
            json={"result": result, "was_cancelled": cancelled},
            expected=(201,),
        )

    for task_id, shapes in zip(ids[:28], scenes, strict=True):
        result = [region(s.box, LABELS[s.cls]) for s in shapes]
        project.expected_lines[task_id] = [
            f"{s.cls} {(s.box[0] + s.box[2]) / 2 / W:.6f} {(s.box[1] + s.box[3]) / 2 / H:.6f} "
            f"{(s.box[2] - s.box[0]) / W:.6f} {(s.box[3] - s.box[1]) / H:.6f}"
            for s in shapes
        ]
        if (
            task_id == ids[0]
        ):  # bad boxes: beside the real ones, one clipped, one outside, one flat, one unknown
            project.bad_boxes = task_id
            result += [
                region((150, 10, 175, 40), "Circle"),
                region((170, 10, 190, 40), "Square"),
                region((20, 20, 20, 50), "Triangle"),
                region((10, 10, 40, 40), "Hexagon"),
            ]
            project.expected_lines[task_id].append(f"0 {155 / W:.6f} {25 / H:.6f} {10 / W:.6f} {30 / H:.6f}")
        if task_id == ids[1]:  # relabeled: a wrong first pass, then the right one
            project.relabeled = task_id
            annotate(task_id, [region((0, 0, 50, 50), "Triangle")])
            time.sleep(0.05)
        annotate(task_id, result)
        project.labeled.append(task_id)
    project.negative, project.broken, project.cancelled, project.unlabeled = ids[28:32]
    annotate(project.negative, [])
    annotate(project.broken, [region((10, 10, 40, 40), "Circle")])
    annotate(project.cancelled, [], cancelled=True)
    project.labeled += [project.negative, project.broken]
    return project


def settings_for(
    ls, model_dir: Path, url: str | None = None, token: str | None = None, **training
) -> Settings:
    env = {
        "LABEL_STUDIO_URL": url or ls.url,
        "LABEL_STUDIO_API_KEY": token or ls.token,
        "MODEL_DIR": str(model_dir),
    }
    return load_settings(env, {"training": {**TINY_TRAINING, **training}})


def version_dirs(project_dir: Path) -> list[str]:
    """Every folder under the project dir that is or could become a version (temporary ones included)."""
    if not project_dir.is_dir():
        return []
    return sorted(
        p.name
        for p in project_dir.iterdir()
        if p.is_dir() and p.name not in (".work", ".cache", REJECTED_DIR)
    )


# --- promotion and the lr policy: pure, fast -----------------------------------------------------------


def test_promotion_rule():
    cand = {"mAP50": 0.80, "f1": 0.5}
    assert decide("mAP50", 0.01, cand, None, 0).promote  # nothing served: publish
    d = decide("mAP50", 0.01, cand, {"mAP50": 0.78}, 10)
    assert d.promote and d.improvement == pytest.approx(0.02)
    d = decide("mAP50", 0.05, cand, {"mAP50": 0.78}, 10)
    assert not d.promote and "< min_improvement 0.05" in d.reasons[0]
    assert not decide(
        "mAP50", -1.0, cand, {"mAP50": 0.78}, 0
    ).promote  # no held-out object: keep what is served
    assert not decide("f1", 0.0, cand, {"f1": 0.6}, 10).promote


def test_learning_rate_policy():
    t = TrainingSettings(lr0=0.01, lr_decay=0.5, lr_min=0.001, base_epochs=40, finetune_epochs=8)
    scratch = plan_run(t, None, 0)
    assert (scratch.kind, scratch.init, scratch.epochs, scratch.lr0) == ("scratch", "yolo11n.yaml", 40, 0.01)
    base = plan_run(t, Path("/m/default/v/model.pt"), 0)  # from the default model: a full base run
    assert (base.kind, base.epochs, base.lr0) == ("base", 40, 0.01)
    second = plan_run(t, Path("/m/7/v1/model.pt"), 1)
    assert (second.kind, second.epochs, second.lr0, second.warmup_epochs) == ("finetune", 8, 0.005, 0.0)
    assert plan_run(t, Path("/m/7/v2/model.pt"), 2).lr0 == pytest.approx(0.0025)
    assert plan_run(t, Path("/m/7/v9/model.pt"), 9).lr0 == 0.001  # floored


@dataclass
class _Split:
    data_yaml: Path
    train_ids: list[int]


def test_small_training_splits_step_every_batch():
    """Below 64 images: about four batches an epoch and no accumulation (nbs = batch), so 16 images do not
    get one optimizer step every four epochs; a big split, and a config that sets nbs, are left alone."""
    t = TrainingSettings(batch=16)
    plan = plan_run(t, None, 0)

    def args(n: int, settings: TrainingSettings = t) -> dict:
        return train_args(settings, plan, _Split(Path("d.yaml"), list(range(n))), "cpu", Path("/r"))  # type: ignore[arg-type]

    assert (args(16)["batch"], args(16)["nbs"]) == (4, 4)
    assert (args(5)["batch"], args(5)["nbs"]) == (2, 2)
    assert (args(63)["batch"], args(63)["nbs"]) == (15, 15)
    assert args(64)["batch"] == 16 and "nbs" not in args(64)
    assert (args(200)["batch"], "nbs" in args(200)) == (16, False)
    explicit = TrainingSettings(batch=16, train_args={"nbs": 8})  # the user's own step arithmetic stays
    assert (args(16, explicit)["batch"], args(16, explicit)["nbs"]) == (16, 8)
    assert args(40, TrainingSettings(batch=4))["batch"] == 4  # never above the configured batch


# --- export + dataset against Label Studio --------------------------------------------------------------


@pytest.mark.labelstudio
def test_export_and_dataset_from_label_studio(label_studio, shapes_project, tmp_path):
    p = shapes_project
    settings = settings_for(label_studio, tmp_path / "models")
    export = export_project(LabelStudioAccess(settings.label_studio), p.id, page_size=7)  # several pages
    assert sorted(t.task_id for t in export.tasks) == sorted(p.labeled)  # no skipped, no unlabeled task
    assert export.skipped == {}  # the skipped task is filtered out by Label Studio itself
    assert export.project_stats == {
        "task_number": 32,
        "num_tasks_with_annotations": len(p.labeled),
        "skipped_annotations_number": 1,
    }

    fetcher = ImageFetcher(LabelStudioAccess(settings.label_studio), settings.images)
    calls: list[str] = []

    def counting_download(url: str) -> bytes:
        calls.append(url)
        return fetcher.download(url)

    cache = ImageCache(tmp_path / "cache")
    kw = dict(holdout_fraction=0.25, download=counting_download, cache=cache, max_pixels=10**7)
    try:
        ds = build_dataset(export, tmp_path / "one", **kw)
        first_calls = len(calls)
        again = build_dataset(export, tmp_path / "two", **kw)
    finally:
        fetcher.close()
    r = ds.report
    assert ds.classes == LABELS
    # The split: disjoint, by hash, and the same on a second build.
    assert set(ds.train_ids).isdisjoint(ds.holdout_ids)
    assert set(ds.holdout_ids) == {t for t in p.labeled if t != p.broken and split_of(t, 0.25) == "holdout"}
    assert (again.train_ids, again.holdout_ids) == (ds.train_ids, ds.holdout_ids)
    assert ds.holdout and ds.train_ids
    # Images: every readable one downloaded once; the broken one is counted, not fatal.
    assert first_calls == len(p.labeled) and len(calls) == first_calls + 1  # only broken.png again
    assert list(r.unreadable_images) == [str(p.broken)]
    assert again.report.images_from_cache == len(p.labeled) - 1

    def label_file(task_id: int) -> Path:
        side = "val" if split_of(task_id, 0.25) == "holdout" else "train"
        return ds.root / "labels" / side / f"{task_id}.txt"

    # The negative task: labeled with no region, so an empty label file (not a missing one).
    assert label_file(p.negative).is_file() and label_file(p.negative).read_text() == ""
    assert r.negative_images == 1
    # Bad boxes: one clipped (kept), one outside and one flat dropped, the unknown label dropped; all counted.
    assert (r.boxes_clipped, r.dropped_out_of_bounds, r.dropped_degenerate) == (1, 1, 1)
    assert r.unknown_labels == {"Hexagon": 1}
    assert label_file(p.bad_boxes).read_text().splitlines() == p.expected_lines[p.bad_boxes]
    # The relabeled task has its latest annotation, not the first one.
    assert label_file(p.relabeled).read_text().splitlines() == p.expected_lines[p.relabeled]
    for task_id in p.labeled[2:28]:
        assert label_file(task_id).read_text().splitlines() == p.expected_lines[task_id]


@pytest.mark.labelstudio
def test_project_that_does_not_exist(label_studio, tmp_path):
    settings = settings_for(label_studio, tmp_path / "models")
    with pytest.raises(ProjectNotFound, match="project 987654 does not exist"):
        run_training("987654", settings)
    with pytest.raises(InvalidProject, match="must be a Label Studio project id, got 'abc'"):
        run_training("abc", settings)


# --- the job --------------------------------------------------------------------------------------------


@pytest.mark.labelstudio
def test_first_model_is_published_then_a_candidate_that_is_not_better_is_rejected(
    label_studio, shapes_project, tmp_path, redis_url, monkeypatch
):
    p = shapes_project
    model_dir = tmp_path / "models"
    store = ModelStore(model_dir)
    project = str(p.id)

    # 1. Nothing served anywhere: a base run from yolo11n.yaml, published as the first version.
    first = run_training(project, settings_for(label_studio, model_dir))
    assert first["promoted"] and not first["skipped"], first
    assert _VERSION.match(first["version"]) and first["version"].startswith("v001-")
    current = store.current(project)
    assert current is not None and current.version == first["version"]
    card = current.metadata()
    for key in (
        "parent",
        "task_ids",
        "settings",
        "metrics",
        "error_analysis",
        "dataset",
        "seconds",
        "decision",
    ):
        assert key in card, key
    assert card["parent"] is None and card["training"]["plan"]["kind"] == "scratch"
    train_ids, holdout_ids = card["task_ids"]["train"], card["task_ids"]["holdout"]
    assert holdout_ids and train_ids and set(train_ids).isdisjoint(holdout_ids)
    assert sorted(train_ids + holdout_ids) == sorted(t for t in p.labeled if t != p.broken)
    assert all(split_of(t, 0.25) == "holdout" for t in holdout_ids)
    cand = card["metrics"]["candidate"]
    assert cand["images"] == len(holdout_ids) and set(cand["per_class"]) == set(LABELS)
    # The same scores on the training split (all of it: fewer than the 200-image sample bound).
    train_metrics = card["metrics"]["train"]
    assert train_metrics["images"] == len(train_ids) and train_metrics["objects"] > 0
    assert 0.0 <= train_metrics["overall"]["mAP50"] <= 1.0
    assert first["metrics"]["train"]["mAP50"] == train_metrics["overall"]["mAP50"]
    assert card["prelabel_review"]["versions"] == {}  # annotated through the API from scratch: no pre-labels
    assert {"precision", "recall", "f1", "mAP50", "mAP50-95", "tp", "fp", "fn"} <= set(cand["overall"])
    assert cand["overall"]["tp"] + cand["overall"]["fn"] == cand["objects"] > 0
    assert set(card["error_analysis"]["candidate"]) >= {"fn_by_class", "fn_by_size", "fn_by_cell", "fp_kinds"}
    assert card["dataset"]["unknown_labels"] == {"Hexagon": 1} and card["dataset"]["negative_images"] == 1
    assert set(card["seconds"]) >= {"export", "dataset", "train", "evaluate", "total"}
    assert (
        card["settings"]["training"]["base_epochs"] == 3
        and card["settings"]["inference"]["prelabel_conf"] == 0.25
    )
    assert "api_key" not in json.dumps(card) and label_studio.token not in json.dumps(card)
    assert not list((model_dir / project / ".work").iterdir())  # the work dir is cleaned after success

    # 2. Nothing changed: no retraining unless forced.
    again = run_training(project, settings_for(label_studio, model_dir))
    assert again["skipped"] and not again["promoted"] and "nothing changed" in again["reasons"][0]

    # 3. Through a real rq worker (settings from the environment, as in production): a fine-tune of v001
    #    that must beat it by an impossible margin, so it is recorded and the pointer stays.
    config = tmp_path / "annoloop.yaml"
    # max_versions 1: after this training, the convergence rules stop automatic retraining.
    config.write_text(
        yaml.safe_dump(
            {
                "training": {
                    **TINY_TRAINING,
                    "min_improvement": 1e9,
                    "convergence": {"max_versions": 1, "max_overfit_gap": None},
                }
            }
        )
    )
    for var, value in {
        "REDIS_URL": redis_url,
        "ANNOLOOP_CONFIG": str(config),
        "LABEL_STUDIO_URL": label_studio.url,
        "LABEL_STUDIO_API_KEY": label_studio.token,
        "MODEL_DIR": str(model_dir),
    }.items():
        monkeypatch.setenv(var, value)
    import redis
    from rq import Queue, SimpleWorker

    conn = redis.Redis.from_url(redis_url)
    queue = Queue("training-test", connection=conn)
    job = queue.enqueue("training.jobs.train_project", project, force=True, job_timeout=900)
    SimpleWorker([queue], connection=conn).work(burst=True)
    job.refresh()
    assert job.get_status() == "finished", job.latest_result().exc_string if job.latest_result() else None
    result = job.return_value()
    assert not result["promoted"] and result["version"].startswith("v002-")
    assert "< min_improvement" in result["reasons"][0]
    assert store.current(project).version == first["version"]  # the pointer did not move
    assert not (model_dir / project / result["version"]).exists()
    rejected = model_dir / project / REJECTED_DIR / result["version"]
    assert sorted(f.name for f in rejected.iterdir()) == ["metadata.json"]  # a card, no weights
    rcard = json.loads((rejected / "metadata.json").read_text())
    assert rcard["parent"] == {"project": project, "version": first["version"]}
    assert rcard["training"]["plan"]["kind"] == "finetune"
    assert rcard["training"]["plan"]["lr0"] == pytest.approx(0.002 * 0.7)  # lr0 * lr_decay ** 1
    assert rcard["training"]["plan"]["epochs"] == 2
    # Both models scored on the same held-out tasks.
    assert rcard["task_ids"]["holdout"] == holdout_ids
    assert (
        rcard["metrics"]["current"]["images"] == rcard["metrics"]["candidate"]["images"] == len(holdout_ids)
    )
    # Progress in the job's meta: every stage, and the epochs of the training stage.
    meta = job.get_meta(refresh=True)
    assert meta["progress"]["stage"] == "done" and meta["epochs_done"] == 2
    assert set(meta["stage_seconds"]) == {"export", "dataset", "train", "evaluate", "publish"}
    # One history file: a row per training, whether run by the queue or not (no attempt log beside it).
    from training.convergence import history_path, read_history
    from training.trigger import project_state

    assert not (model_dir / project / "history.jsonl").exists()
    first_row, row = read_history(history_path(model_dir, project))
    assert (first_row.version, first_row.promoted, row.version, row.promoted) == (
        first["version"],
        True,
        result["version"],
        False,
    )
    assert first_row.data_fingerprint == card["data_fingerprint"] and first_row.parent == ""
    assert row.data_fingerprint == rcard["data_fingerprint"] and row.parent == f"{project}/{first['version']}"
    assert row.labeled_tasks == len(train_ids) + len(holdout_ids)
    assert row.holdout_tasks == len(holdout_ids)  # what the stop rules weigh
    assert row.heldout_map50 == pytest.approx(result["metrics"]["candidate"]["mAP50"])
    # The training-split mAP50 the overfitting rule needs is there, from the same evaluation code.
    assert row.train_map50 == pytest.approx(rcard["metrics"]["train"]["overall"]["mAP50"])
    assert row.train_map50 is not None and first_row.train_map50 is not None
    assert (row.metric, row.candidate, row.current) == (
        "mAP50",
        result["metrics"]["candidate"]["mAP50"],
        rcard["metrics"]["current"]["overall"]["mAP50"],
    )
    assert "< min_improvement" in row.reason and row.model_card == str(rejected / "metadata.json")
    assert row.prelabel_version == "" and row.prelabel_predicted is None  # no pre-labels were reviewed
    # The job went through the trigger (running -> idle) and the convergence tracking (pause).
    assert result["convergence"]["keep_training"] is False
    state = project_state(conn, project)
    assert state["state"] == "idle" and state["paused"].startswith("version budget spent")


@pytest.mark.labelstudio
def test_label_studio_unreachable_or_refusing_the_key(
    label_studio, shapes_project, tmp_path, starter_weights
):
    model_dir = tmp_path / "models"
    project = str(shapes_project.id)
    publish(model_dir, starter_weights("detect"), "v000-seed", project=project)
    pointer = ModelStore(model_dir).pointer(project)
    before = (pointer.read_text(), pointer.stat().st_mtime_ns)

    down = settings_for(label_studio, model_dir, url=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(
        LabelStudioUnavailable, match=r"Label Studio at http://127\.0\.0\.1:\d+ is unreachable"
    ):
        run_training(project, down)
    wrong_key = settings_for(label_studio, model_dir, token="0" * 40)
    with pytest.raises(LabelStudioUnavailable, match=r"refused the API key .*LABEL_STUDIO_API_KEY"):
        run_training(project, wrong_key)

    assert (pointer.read_text(), pointer.stat().st_mtime_ns) == before
    assert version_dirs(model_dir / project) == ["v000-seed"]
    assert not list((model_dir / project / ".work").iterdir())


@pytest.mark.labelstudio
def test_killed_mid_training_leaves_the_served_model_untouched(
    label_studio, shapes_project, tmp_path, starter_weights
):
    model_dir = tmp_path / "models"
    project = str(shapes_project.id)
    publish(model_dir, starter_weights("detect"), "starter")  # the default model: the warm-start parent
    store = ModelStore(model_dir)
    default_pointer = store.pointer(DEFAULT_PROJECT)
    before = (default_pointer.read_text(), default_pointer.stat().st_mtime_ns)
    config = tmp_path / "long.yaml"
    config.write_text(yaml.safe_dump({"training": {**TINY_TRAINING, "base_epochs": 200}}))
    env = {
        **os.environ,
        "ANNOLOOP_CONFIG": str(config),
        "LABEL_STUDIO_URL": label_studio.url,
        "LABEL_STUDIO_API_KEY": label_studio.token,
        "MODEL_DIR": str(model_dir),
        "YOLO_OFFLINE": "1",
    }
    log = tmp_path / "job.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", f"from training.jobs import train_project; train_project({project!r})"],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    work = model_dir / project / ".work"
    try:
        deadline = time.monotonic() + 180
        checkpoints: list[Path] = []
        while time.monotonic() < deadline and proc.poll() is None and not checkpoints:
            checkpoints = list(work.glob("run-*/runs/train/weights/last.pt")) if work.is_dir() else []
            time.sleep(0.1)
        assert checkpoints, f"no training checkpoint appeared; job log:\n{log.read_text()[-3000:]}"
        proc.send_signal(signal.SIGKILL)  # mid-training: the first epoch's weights exist, 199 epochs to go
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    assert list(work.glob("run-*"))  # the crash left its work behind ...
    assert version_dirs(model_dir / project) == []  # ... but no version folder, not even a temporary one
    assert store.current(project) is None and not store.pointer(project).exists()
    assert (default_pointer.read_text(), default_pointer.stat().st_mtime_ns) == before
    assert store.served(project).version == "starter"

    # The next run clears the crashed run's left-overs and warm-starts from the served default model.
    result = run_training(project, settings_for(label_studio, model_dir))
    assert not list(work.iterdir())
    assert result["parent"] == {"project": DEFAULT_PROJECT, "version": "starter"}
    assert result["metrics"]["current"] is not None  # the default model, scored on the same held-out tasks
    card_path = Path(result["model_card"])
    card = json.loads(card_path.read_text())
    assert card["training"]["plan"]["kind"] == "base" and card["training"]["plan"]["init"] == str(
        store.current(DEFAULT_PROJECT).weights
    )
    # The default model names its classes circle/square/triangle: mapped onto the config's labels.
    assert card["metrics"]["current"]["class_map"] == {
        "circle": "Circle",
        "square": "Square",
        "triangle": "Triangle",
    }
    if result["promoted"]:
        assert store.current(project).version == result["version"] == card_path.parent.name
    else:
        assert store.current(project) is None and card_path.parent.parent.name == REJECTED_DIR
    assert (default_pointer.read_text(), default_pointer.stat().st_mtime_ns) == before


# --- failures through a real `annoloop worker`: retried or not -------------------------------------------------


ANNOLOOP_TRAIN = (str(Path(sys.executable).parent / "annoloop"), "train", "--project")


def start_worker(env: dict[str, str], log: Path) -> subprocess.Popen:
    """`annoloop worker` as deployed, in its own process group (so that it can be killed with its children)."""
    return subprocess.Popen(
        [str(Path(sys.executable).parent / "annoloop"), "worker"],
        env={**os.environ, **env},
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def stop_worker(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)


@pytest.mark.labelstudio
def test_a_job_that_cannot_succeed_fails_at_once_and_an_outage_is_retried(
    label_studio, shapes_project, tmp_path, private_redis
):
    """`annoloop train --wait` against a real worker: a project that does not exist fails on the first attempt
    with Label Studio's answer, although the queue would retry twice; Label Studio unreachable is retried."""
    import redis
    from rq.job import Job

    from training.trigger import project_state

    redis_url = private_redis
    config = tmp_path / "annoloop.yaml"
    # Two retries, without delay: a retried job is back on the queue at once, so the outcome does not depend
    # on rq's scheduler.
    config.write_text(
        yaml.safe_dump({"training": {**TINY_TRAINING, "retry_max": 2, "retry_intervals_s": [0]}})
    )
    env = {
        "REDIS_URL": redis_url,
        "ANNOLOOP_CONFIG": str(config),
        "LABEL_STUDIO_URL": label_studio.url,
        "LABEL_STUDIO_API_KEY": label_studio.token,
        "MODEL_DIR": str(tmp_path / "models"),
        "LOG_LEVEL": "INFO",
    }
    conn = redis.Redis.from_url(redis_url)

    def train(project: str, **extra_env: str) -> tuple[subprocess.CompletedProcess, Job]:
        out = subprocess.run(
            [*ANNOLOOP_TRAIN, project, "--wait", "--poll", "0.2", "--timeout", "300"],
            env={**os.environ, **env, **extra_env},
            capture_output=True,
            text=True,
            timeout=400,
        )
        return out, Job.fetch(project_state(conn, project)["job_id"], connection=conn)

    worker = start_worker(env, tmp_path / "worker.log")
    try:
        out, job = train("987654")
        assert out.returncode == 1, out.stdout + out.stderr
        assert "ProjectNotFound: Label Studio project 987654 does not exist" in out.stderr
        assert job.get_status(refresh=True) == "failed"
        assert job.get_meta(refresh=True)["attempts"] == 1  # not retried, although two retries were allowed
        assert '"event": "training failed: not retried"' in (tmp_path / "worker.log").read_text()
        # The failed job does not block the project: the next request enqueues a new one.
        _, second = train("987654")
        assert second.id != job.id and second.get_meta(refresh=True)["attempts"] == 1
    finally:
        stop_worker(worker)
    assert worker.returncode == 0  # a graceful stop

    # Label Studio unreachable (the worker is told a port nobody listens on): worth retrying, and retried.
    down = {"LABEL_STUDIO_URL": f"http://127.0.0.1:{free_port()}"}
    worker = start_worker({**env, **down}, tmp_path / "worker-down.log")
    try:
        out, job = train(str(shapes_project.id), **down)
        assert out.returncode == 1, out.stdout + out.stderr
        assert "LabelStudioUnavailable: Label Studio at http://127.0.0.1:" in out.stderr
        assert job.get_status(refresh=True) == "failed"
        assert job.get_meta(refresh=True)["attempts"] == 3  # the first attempt and both retries
    finally:
        stop_worker(worker)
