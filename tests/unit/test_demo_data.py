"""The demo's built-in set: a VOC folder the importer reads, with the night shift the demo's curve relies on."""

from __future__ import annotations

import numpy as np
from PIL import Image

from annoloop.datasets import read_voc
from annoloop.demo_data import write_demo_dataset


def _brightness(path) -> float:
    return float(np.asarray(Image.open(path).convert("L"), dtype=np.float32).mean())


def test_demo_set_has_night_scenes_rare_triangles_and_reads_as_voc(tmp_path):
    root = write_demo_dataset(tmp_path / "demo", n=60, seed=1, width=160, height=120)
    ds = read_voc(root)
    assert len(ds.images) == 60
    assert set(ds.labels) == {"circle", "square", "triangle"}
    night = [im for im in ds.images if "night" in im.path.name]
    day = [im for im in ds.images if "night" not in im.path.name]
    assert 15 <= len(night) <= 45  # night_share 0.5 of 60 scenes (a binomial draw)
    assert all(im.boxes for im in ds.images)
    # Night frames are much darker than day frames (brightness scaled by 0.15-0.25 plus a small cast).
    assert max(_brightness(im.path) for im in night) < min(_brightness(im.path) for im in day)
    counts = {c: sum(b.label == c for im in ds.images for b in im.boxes) for c in ds.labels}
    assert counts["triangle"] < min(counts["circle"], counts["square"]) / 3


def test_night_share_zero_gives_daylight_only(tmp_path):
    ds = read_voc(write_demo_dataset(tmp_path / "day", n=12, seed=0, width=96, height=72, night_share=0.0))
    assert not [im for im in ds.images if "night" in im.path.name]
