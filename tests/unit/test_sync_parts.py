"""The sync's pure parts: score cache keys, cheap features, version names, result label counts."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime

import numpy as np
import pytest

from annoloop.cli import _duration
from sync.features import cheap_features
from sync.job import OURS, _stamp, result_labels
from sync.score_cache import ScoreCache, Scored


def _row(task: int, image: str, version: str, u: float | None = 0.5) -> Scored:
    emb = np.arange(8, dtype=np.float32) + task
    return Scored(task, image, version, u, emb, {"circle": 2}, [{"value": {"rectanglelabels": ["circle"]}}])


def test_score_cache_hits_only_same_model_and_same_image(tmp_path):
    with ScoreCache(tmp_path / "c.sqlite") as cache:
        cache.store([_row(1, "a.png", "v1"), _row(2, "b.png", "v1"), _row(3, "c.png", "v1", None)])
        hits = cache.lookup([(1, "a.png"), (2, "changed.png"), (3, "c.png"), (4, "d.png")], "v1")
        assert set(hits) == {1, 3}
        assert hits[1].labels == {"circle": 2} and hits[1].result[0]["value"]["rectanglelabels"] == ["circle"]
        np.testing.assert_allclose(hits[1].embedding, np.arange(8) + 1)  # float16 round trip, exact here
        assert hits[3].uncertainty is None
        assert cache.lookup([(1, "a.png")], "v2") == {}  # a new model scores again
        cache.store([_row(1, "a.png", "v2")])  # replaces the row: one row per task
        assert cache.lookup([(1, "a.png")], "v1") == {}
        assert cache.forget_except({1}) == 2
        assert set(cache.lookup([(1, "a.png"), (2, "b.png")], "v2")) == {1}
    with ScoreCache(tmp_path / "c.sqlite") as again:  # survives a restart
        assert set(again.lookup([(1, "a.png")], "v2")) == {1}


def test_score_cache_lookup_beyond_sqlite_parameter_limit(tmp_path):
    with ScoreCache(tmp_path / "c.sqlite") as cache:
        cache.store([_row(i, f"{i}.png", "v1") for i in range(1200)])
        assert len(cache.lookup([(i, f"{i}.png") for i in range(1200)], "v1")) == 1200


def test_cheap_features_see_near_duplicates_as_close():
    rng = np.random.default_rng(0)
    a = np.kron(rng.integers(0, 255, (6, 8, 3)), np.ones((20, 20, 1))).astype(np.uint8)
    a_noisy = np.clip(a.astype(int) + rng.integers(-5, 6, a.shape), 0, 255).astype(np.uint8)
    b = np.kron(rng.integers(0, 255, (6, 8, 3)), np.ones((20, 20, 1))).astype(np.uint8)
    fa, fn, fb = cheap_features(a), cheap_features(a_noisy), cheap_features(b)
    assert fa.shape == (352,) and np.isfinite(fa).all()
    assert np.linalg.norm(fa - fn) < 0.5 * np.linalg.norm(fa - fb)
    flat = cheap_features(np.full((50, 60, 3), 128, np.uint8))
    assert np.isfinite(flat).all()  # a blank image does not divide by zero


def test_annoloop_versions_are_recognised_and_others_are_not():
    mine = f"v002-20261122T101010Z@{_stamp(datetime(2026, 11, 22, 10, 30, 0, 123456, tzinfo=UTC))}"
    assert mine == "v002-20261122T101010Z@20261122T103000.123Z"
    assert OURS.match(mine) and OURS.match("cold-start@20261122T103000.000Z")
    for other in ("v002-20261122T101010Z", "someone-else", "yolo@latest", "x@20261122T103000Z extra"):
        assert not OURS.match(other)


def test_result_labels_counts_every_region_type():
    result = [
        {"value": {"rectanglelabels": ["circle"]}},
        {"value": {"rectanglelabels": ["circle"]}},
        {"value": {"polygonlabels": ["square"]}},
        {"value": {"choices": ["cat"]}},
        {"value": {}},
    ]
    assert result_labels(result) == {"circle": 2, "square": 1, "cat": 1}


def test_duration_parsing():
    assert (
        _duration("10m") == 600
        and _duration("30s") == 30
        and _duration("2h") == 7200
        and _duration("45") == 45
    )
    for bad in ("", "m", "ten minutes", "0s", "-5m"):
        with pytest.raises(argparse.ArgumentTypeError):
            _duration(bad)


def test_a_default_model_of_other_classes_is_a_cold_start(tmp_path):
    """The sync ranks a project as a cold start while only a default model that knows none of its labels is
    served (its card lists the classes); a fitting default, a card without classes, or the project's own
    model are used as they are."""
    from annoloop.model_store import DEFAULT_PROJECT, ModelStore
    from sync.job import _default_fits

    store = ModelStore(tmp_path)
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"not read here")
    cells = '<View><Image name="i" value="$image"/><RectangleLabels name="l" toName="i"><Label value="RBC"/><Label value="WBC"/></RectangleLabels></View>'
    shapes = cells.replace('"RBC"', '"Circle"')
    starter = store.publish(
        DEFAULT_PROJECT, "s1", weights, {"task": "detect", "classes": ["circle", "square"]}
    )
    assert not _default_fits(starter, cells)
    assert _default_fits(starter, shapes)  # one label maps (case-insensitively): usable
    legacy = store.publish(DEFAULT_PROJECT, "s0", weights, {"task": "detect"})
    assert _default_fits(legacy, cells)
    own = store.publish("5", "v001", weights, {"task": "detect", "classes": ["circle", "square"]})
    assert _default_fits(own, cells)
