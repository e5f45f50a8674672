"""Labeling-config parsing and class mapping (pure logic over label-studio-sdk's parser)."""

from __future__ import annotations

import pytest

from ml_backend.label_config import LabelConfigError, map_classes, parse_label_config, select_output

NAMES = {0: "circle", 1: "square", 2: "triangle"}


def cfg(body: str) -> str:
    return f'<View><Image name="image" value="$img"/>{body}</View>'


def test_parse_finds_controls_bound_to_images():
    (c,) = parse_label_config(
        cfg(
            '<RectangleLabels name="box" toName="image"><Label value="Circle"/><Label value="Dot"/></RectangleLabels>'
        )
    )
    assert (c.from_name, c.to_name, c.tag, c.data_key) == ("box", "image", "RectangleLabels", "img")
    assert c.labels == ("Circle", "Dot")


def test_mapping_is_case_insensitive_and_honours_predicted_values():
    (c,) = parse_label_config(
        cfg(
            '<RectangleLabels name="b" toName="image"><Label value="CIRCLE"/>'
            '<Label value="Box" predicted_values="square, triangle"/><Label value="Unused"/></RectangleLabels>'
        )
    )
    assert map_classes(c, NAMES) == {0: "CIRCLE", 1: "Box", 2: "Box"}


def test_predicted_values_win_over_a_name_match():
    (c,) = parse_label_config(
        cfg(
            '<RectangleLabels name="b" toName="image"><Label value="square"/>'
            '<Label value="Quad" predicted_values="square"/></RectangleLabels>'
        )
    )
    assert map_classes(c, NAMES) == {1: "Quad"}


def test_unmapped_classes_are_dropped():
    (c,) = parse_label_config(
        cfg('<RectangleLabels name="b" toName="image"><Label value="Triangle"/></RectangleLabels>')
    )
    spec = select_output((c,), "detect", NAMES)
    assert spec.label_of == {2: "Triangle"}


def test_select_output_picks_the_control_for_the_model_task():
    controls = parse_label_config(
        cfg(
            '<Choices name="c" toName="image"><Choice value="circle"/></Choices>'
            '<PolygonLabels name="p" toName="image"><Label value="circle"/><Label value="square"/></PolygonLabels>'
            '<RectangleLabels name="r" toName="image"><Label value="circle"/></RectangleLabels>'
        )
    )
    assert select_output(controls, "detect", NAMES).control.from_name == "r"
    assert select_output(controls, "segment", NAMES).control.from_name == "p"  # more classes mapped
    assert select_output(controls, "classify", NAMES).control.from_name == "c"


def test_errors_say_what_to_change():
    with pytest.raises(LabelConfigError, match="no supported control"):
        parse_label_config(
            '<View><Text name="t" value="$t"/><Labels name="l" toName="t"><Label value="a"/></Labels></View>'
        )
    with pytest.raises(LabelConfigError, match="empty"):
        parse_label_config("  ")
    (c,) = parse_label_config(
        cfg('<RectangleLabels name="b" toName="image"><Label value="Cat"/></RectangleLabels>')
    )
    with pytest.raises(LabelConfigError, match='predicted_values="class_a,class_b"'):
        select_output((c,), "detect", NAMES)
    with pytest.raises(LabelConfigError, match="classify model and needs Choices"):
        select_output((c,), "classify", NAMES)
