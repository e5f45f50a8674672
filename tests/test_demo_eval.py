"""The demo's fixed-test-set scoring, with a real (cached, tiny) model: night scenes score below day scenes."""

from __future__ import annotations

from annoloop.datasets import read_voc
from annoloop.demo_data import write_demo_dataset
from annoloop.demo_eval import TestScore, score_model, write_curve


def test_scores_per_group_and_writes_the_curve(tmp_path, starter_weights):
    weights = starter_weights("detect")  # trained on clean daylight shapes only
    images = read_voc(write_demo_dataset(tmp_path / "test", n=40, seed=5, width=320, height=240)).images
    groups = {"day": lambda im: "night" not in im.path.name, "night": lambda im: "night" in im.path.name}
    s = score_model(weights, "starter", 0, images, groups, imgsz=128, workdir=tmp_path / "w")
    assert set(s.map50) == {"all", "day", "night"}
    assert s.map50["day"] > 0.6  # the model does see daylight shapes ...
    assert s.map50["night"] < s.map50["day"] - 0.2  # ... and much less at night
    assert min(s.map50["day"], s.map50["night"]) <= s.map50["all"] <= max(s.map50["day"], s.map50["night"])
    assert s.line().startswith(f"test mAP50 {s.map50['all']:.3f} (day ")
    assert not (tmp_path / "w" / "starter-all").exists()  # symlink folders cleaned up

    # A model of other classes scores 0 without running a validation on labels it cannot have.
    cells = [im for im in images[:3]]
    for im in cells:
        im.boxes = [type(b)("RBC", b.x0, b.y0, b.x1, b.y1) for b in im.boxes]
    other = score_model(weights, "starter", 0, cells, {}, imgsz=128, workdir=tmp_path / "w2")
    assert other.map50 == {"all": 0.0} and not (tmp_path / "w2").exists()

    later = TestScore(
        "v001", 20, {"all": 0.9, "day": 0.95, "night": None}, {"all": 0.6, "day": 0.7, "night": None}
    )
    png, md = write_curve([s, later], tmp_path / "report", "t")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = md.read_text().splitlines()
    assert lines[0] == "| labels | model | mAP50 all | mAP50 day | mAP50 night | mAP50-95 all |"
    assert lines[3] == "| 20 | v001 | 0.900 | 0.950 | - | 0.600 |"
