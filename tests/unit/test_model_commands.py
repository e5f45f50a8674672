"""Listing versions and rolling back, over a real model store on disk."""

from __future__ import annotations

import pytest

from annoloop.model_commands import format_versions, list_versions, rollback
from annoloop.model_store import ModelStore, ModelStoreError


@pytest.fixture
def store(tmp_path):
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"not really weights")
    s = ModelStore(tmp_path / "models")
    s.publish("3", "v001", weights, {"metrics": {"candidate": {"overall": {"mAP50": 0.5, "recall": 0.4}}}})
    s.publish(
        "3",
        "v002",
        weights,
        {
            "parent": {"project": "3", "version": "v001"},
            "metrics": {"candidate": {"overall": {"mAP50": 0.7}}},
        },
    )
    return s


def test_list_marks_the_current_version_with_metrics(store):
    rows = list_versions(store, "3")
    assert [(r.version, r.current) for r in rows] == [("v001", False), ("v002", True)]
    assert rows[0].metrics == {"mAP50": 0.5, "recall": 0.4}
    assert rows[1].parent == "v001" and rows[1].metrics == {"mAP50": 0.7}
    text = format_versions(rows)
    assert "* v002" in text and "0.700" in text and "  v001" in text


def test_rollback_moves_the_pointer(store):
    assert rollback(store, "3", "v001") == "v002"
    assert store.current("3").version == "v001"


def test_rollback_to_an_unknown_version_changes_nothing(store):
    with pytest.raises(ModelStoreError, match=r"no version 'v999' \(versions: v001, v002\)"):
        rollback(store, "3", "v999")
    assert store.current("3").version == "v002"
