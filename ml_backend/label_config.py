"""What a Label Studio labeling config asks of the model, and how model classes map onto its labels.

Parsing uses label-studio-sdk's ``LabelInterface``. Results are cached by config text because Label Studio
sends the config with every /setup and /predict call and /setup has to stay cheap.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from label_studio_sdk.label_interface import LabelInterface

# Control tag -> the model task whose output fills it, in order of preference per task.
CONTROL_TASKS: dict[str, str] = {
    "RectangleLabels": "detect",
    "PolygonLabels": "segment",
    "Choices": "classify",
}
# Which controls each model task can fill (a segmentation model also gives boxes).
TASK_CONTROLS: dict[str, tuple[str, ...]] = {
    "detect": ("RectangleLabels",),
    "segment": ("PolygonLabels", "RectangleLabels"),
    "classify": ("Choices",),
}


class LabelConfigError(ValueError):
    """The labeling config cannot be served by this model; the message says what to change."""


@dataclass(frozen=True)
class Control:
    """One supported control tag bound to an Image object."""

    from_name: str
    to_name: str
    tag: str  # RectangleLabels | PolygonLabels | Choices
    data_key: str  # key in task["data"] holding the image URL ("$image" -> "image")
    labels: tuple[str, ...]
    predicted_values: tuple[tuple[str, tuple[str, ...]], ...]  # label -> model class names it stands for


@dataclass(frozen=True)
class OutputSpec:
    """The control the model fills and which model class index becomes which label."""

    control: Control
    class_to_label: tuple[tuple[int, str], ...]

    @property
    def label_of(self) -> dict[int, str]:
        return dict(self.class_to_label)


@lru_cache(maxsize=128)
def parse_label_config(xml: str) -> tuple[Control, ...]:
    """The supported controls of a config; LabelConfigError when there are none."""
    if not isinstance(xml, str) or not xml.strip():
        raise LabelConfigError("the labeling config is empty")
    try:
        interface = LabelInterface(xml)
    except Exception as e:
        raise LabelConfigError(f"the labeling config is not valid XML: {e}") from None
    controls = []
    for control in interface.controls:
        if control.tag not in CONTROL_TASKS:
            continue
        for obj in control.objects:
            if obj.tag != "Image" or not obj.value_name:
                continue
            pv = []
            for label, tag in control.labels_attrs.items():
                names = tag.attr.get("predicted_values")
                if names:
                    pv.append((label, tuple(n.strip() for n in names.split(",") if n.strip())))
            controls.append(
                Control(control.name, obj.name, control.tag, obj.value_name, tuple(control.labels), tuple(pv))
            )
    if not controls:
        found = sorted({c.tag for c in interface.controls}) or ["none"]
        raise LabelConfigError(
            "the labeling config has no supported control on an <Image>: annoloop fills RectangleLabels, "
            f"PolygonLabels or Choices (found: {', '.join(found)})"
        )
    return tuple(controls)


def map_classes(control: Control, model_names: dict[int, str]) -> dict[int, str]:
    """Model class index -> config label: by ``predicted_values`` first, then by name, case-insensitively."""
    by_name: dict[str, str] = {}
    for label in control.labels:
        by_name.setdefault(label.lower(), label)
    for label, names in control.predicted_values:  # explicit mapping wins over a name match
        for name in names:
            by_name[name.lower()] = label
    return {idx: by_name[name.lower()] for idx, name in model_names.items() if name.lower() in by_name}


def _listing(names, limit: int = 20) -> str:
    names = list(names)
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def select_output(controls: tuple[Control, ...], task: str, model_names: dict[int, str]) -> OutputSpec:
    """Pick the control this model can fill with the most mapped classes; explain when none fits."""
    usable = [c for tag in TASK_CONTROLS.get(task, ()) for c in controls if c.tag == tag]
    if not usable:
        wanted = " or ".join(TASK_CONTROLS.get(task, ("?",)))
        have = ", ".join(sorted({c.tag for c in controls}))
        raise LabelConfigError(
            f"the served model is a {task} model and needs {wanted} in the config (found: {have})"
        )
    best = max(usable, key=lambda c: len(map_classes(c, model_names)))
    mapping = map_classes(best, model_names)
    if not mapping:
        raise LabelConfigError(
            f"none of the labels of <{best.tag} name={best.from_name!r}> ({', '.join(best.labels) or 'none'}) "
            f"maps to a model class ({_listing(model_names.values())}); rename a label to a class name or add "
            'predicted_values="class_a,class_b" to a <Label>'
        )
    return OutputSpec(best, tuple(sorted(mapping.items())))
