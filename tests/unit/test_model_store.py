"""The model store on a real disk: published versions and rejected cards are written all or nothing, and the
`annoloop models` table shows what annotators did to each version's pre-labels."""

from __future__ import annotations

import json
import os

import pytest

from annoloop import model_store
from annoloop.model_commands import format_versions, list_versions
from annoloop.model_store import METADATA_NAME, REJECTED_DIR, WEIGHTS_NAME, ModelStore, ModelStoreError


@pytest.fixture
def weights(tmp_path):
    w = tmp_path / "w.pt"
    w.write_bytes(b"weights")
    return w


def hidden_or_temporary(folder):
    return [p.name for p in folder.iterdir() if p.name.startswith(".") and p.name != ".current"]


def test_record_rejected_writes_only_the_card_and_leaves_the_pointer(tmp_path, weights):
    store = ModelStore(tmp_path / "models")
    store.publish("3", "v001-a", weights, {"metrics": {}})
    mv = store.record_rejected("3", "v002-b", {"version": "v002-b", "decision": {"promote": False}})
    assert mv.path == tmp_path / "models" / "3" / REJECTED_DIR / "v002-b"
    assert sorted(p.name for p in mv.path.iterdir()) == [METADATA_NAME]  # no weights
    assert mv.metadata()["decision"] == {"promote": False}
    assert store.current("3").version == "v001-a"
    assert [v.version for v in store.versions("3")] == ["v001-a"]  # a rejected card is not a version
    assert [v.version for v in store.rejected("3")] == ["v002-b"]
    assert hidden_or_temporary(mv.path.parent) == []
    with pytest.raises(ModelStoreError, match="already exists"):
        store.record_rejected("3", "v002-b", {})
    with pytest.raises(ModelStoreError, match="invalid version name"):
        store.record_rejected("3", "../escape", {})


@pytest.mark.parametrize("kind", ["publish", "record_rejected"])
def test_a_failed_write_leaves_nothing_behind(tmp_path, weights, monkeypatch, kind):
    """A crash while the folder is written (here: the rename fails) leaves neither the folder nor a
    temporary one, and the pointer where it was."""
    store = ModelStore(tmp_path / "models")
    store.publish("3", "v001-a", weights, {})

    def broken_rename(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(model_store.os, "rename", broken_rename)
    with pytest.raises(OSError, match="disk gone"):
        if kind == "publish":
            store.publish("3", "v002-b", weights, {})
        else:
            store.record_rejected("3", "v002-b", {})
    project_dir = tmp_path / "models" / "3"
    assert not (project_dir / "v002-b").exists() and not (project_dir / REJECTED_DIR / "v002-b").exists()
    assert hidden_or_temporary(project_dir) == []
    if (project_dir / REJECTED_DIR).exists():
        assert os.listdir(project_dir / REJECTED_DIR) == []
    assert store.current("3").version == "v001-a"


def test_publish_writes_weights_and_card(tmp_path, weights):
    store = ModelStore(tmp_path / "models")
    mv = store.publish("3", "v001-a", weights, {"created_at": "x"})
    assert (mv.path / WEIGHTS_NAME).read_bytes() == b"weights"
    assert json.loads((mv.path / METADATA_NAME).read_text()) == {"created_at": "x"}
    assert store.current("3") == mv


def review(predicted, accepted):
    return {"predicted": predicted, "accepted": accepted, "acceptance_rate": accepted / predicted}


def test_models_table_shows_each_versions_prelabel_review_from_later_cards(tmp_path, weights):
    store = ModelStore(tmp_path / "models")
    store.publish("3", "v001-a", weights, {"created_at": "2026-11-22T01:00:00"})
    # v002 reviewed v001's pre-labels (10 of them, 6 kept) ...
    store.publish(
        "3",
        "v002-b",
        weights,
        {
            "created_at": "2026-11-22T02:00:00",
            "parent": {"project": "3", "version": "v001-a"},
            "prelabel_review": {"versions": {"v001-a": review(10, 6)}},
        },
    )
    # ... a later, rejected candidate saw more of them (v001's pre-labels stay in Label Studio) and v002's.
    store.record_rejected(
        "3",
        "v003-c",
        {
            "created_at": "2026-11-22T03:00:00",
            "prelabel_review": {"versions": {"v001-a": review(12, 9), "v002-b": review(4, 1)}},
        },
    )
    rows = {r.version: r for r in list_versions(store, "3")}
    assert rows["v001-a"].prelabel["predicted"] == 12 and rows["v001-a"].prelabel["accepted"] == 9
    assert rows["v002-b"].prelabel["acceptance_rate"] == 0.25
    text = format_versions(list(rows.values()))
    header, first, second = text.splitlines()
    assert header.split()[-2:] == ["reviewed", "kept"]
    assert first.split()[-2:] == ["12", "75%"] and second.split()[-2:] == ["4", "25%"]
    assert second.startswith("* v002-b")
