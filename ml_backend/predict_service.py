"""The /setup and /predict logic, free of HTTP so it can be driven and measured directly.

A request is answered task by task: a task whose image is missing, unreachable or unreadable gets an empty
result and its reason, the rest of the batch is predicted in one model call.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from annoloop.images import ImageError, ImageFetcher
from annoloop.model_store import DEFAULT_PROJECT
from config.settings import Settings
from ml_backend import uncertainty as unc
from ml_backend.inference import Detections
from ml_backend.label_config import Control, LabelConfigError, OutputSpec, parse_label_config, select_output
from ml_backend.model_holder import LoadedModel, ModelRegistry
from ml_backend.regions import to_results

log = logging.getLogger(__name__)

#: Why a project gets no predictions while only a default model of other classes is served.
NO_MODEL_FOR_LABELS = (
    "the default model knows none of this project's labels; pre-labels start with the project's first model"
)


class BadRequest(ValueError):
    """The request as a whole cannot be answered (400); the message says why."""


@dataclass
class TaskOutcome:
    result: list[dict[str, Any]] = field(default_factory=list)
    score: float | None = None
    uncertainty: float | None = None
    error: str | None = None
    embedding: np.ndarray | None = None  # pooled backbone features, when asked for (the sync's diversity)


def uncertainty_config(settings: Settings) -> unc.UncertaintyConfig:
    u = settings.uncertainty
    return unc.UncertaintyConfig(
        weights=u.weights.model_dump(),
        aggregation=u.aggregation,
        top_k=u.top_k,
        empty_floor=u.empty_floor,
        count_half_saturation=u.count_half_saturation,
    )


def image_uncertainty(det: Detections, cfg: unc.UncertaintyConfig, min_conf: float) -> unc.ImageUncertainty:
    """Uncertainty of one image from every region at or above the (low) uncertainty threshold."""
    if det.probs is not None:
        return unc.classification_uncertainty(det.probs, cfg)
    keep = det.confidences >= min_conf
    scores = det.class_scores[keep] if det.class_scores is not None else None
    return unc.detection_uncertainty(scores, det.confidences[keep], cfg)


def task_image_url(task: Any, control: Control) -> str:
    if not isinstance(task, dict):
        raise ImageError(f"task is a {type(task).__name__}, not an object")
    data = task.get("data")
    if not isinstance(data, dict):
        raise ImageError("task has no 'data' object")
    url = data.get(control.data_key)
    if not isinstance(url, str) or not url:
        raise ImageError(
            f"task data has no image field {control.data_key!r} (keys: {', '.join(data) or 'none'})"
        )
    return url


class PredictService:
    def __init__(self, settings: Settings, registry: ModelRegistry | None, fetcher: ImageFetcher):
        self.settings = settings
        self.registry = registry
        self.fetcher = fetcher
        self._ucfg = uncertainty_config(settings)

    def model_for(self, project: str) -> LoadedModel | None:
        return self.registry.holder(project).get() if self.registry is not None else None

    def predict_images(
        self,
        model: LoadedModel,
        spec: OutputSpec,
        images: dict[int, np.ndarray],
        outcomes: list[TaskOutcome],
        embed: bool = False,
    ) -> None:
        """One model call over decoded ``images`` (keyed by their index in ``outcomes``), filling outcomes."""
        inf = self.settings.inference
        try:
            detections: list[Detections | Exception] = list(model.predict(list(images.values()), embed=embed))
        except Exception:
            # Find the image that broke the batch: predict one by one so only that task fails.
            log.exception("batched inference failed; retrying image by image")
            detections = []
            for image in images.values():
                try:
                    detections.append(model.predict([image], embed=embed)[0])
                except Exception as e:
                    detections.append(e)
        for i, det in zip(images, detections, strict=True):
            if isinstance(det, Exception):
                outcomes[i].error = f"inference failed: {type(det).__name__}: {det}"
                continue
            u = image_uncertainty(det, self._ucfg, inf.uncertainty_conf)
            outcomes[i].result = to_results(det, spec, inf.prelabel_conf)
            outcomes[i].uncertainty = u.value
            outcomes[i].score = unc.task_score(u.value)
            outcomes[i].embedding = det.embedding

    def setup(self, project: str, label_config: str) -> str | None:
        """Validate the config against the served model; return its version (None when there is no model)."""
        try:
            controls = parse_label_config(label_config)
        except LabelConfigError as e:
            raise BadRequest(str(e)) from None
        model = self.model_for(project)
        if model is None:
            return None
        try:
            select_output(controls, model.task, model.names)
        except LabelConfigError as e:
            if self._is_foreign_default(model, project):
                return None
            raise BadRequest(str(e)) from None
        return model.version

    def _is_foreign_default(self, model: LoadedModel, project: str) -> bool:
        """The default model serving a project whose labels it does not know counts as no model: the project
        can still connect, and its first training starts from these weights (features transfer), but there is
        nothing to pre-label with. A project's own model that does not fit its config stays an error."""
        if model.project != DEFAULT_PROJECT or project == DEFAULT_PROJECT:
            return False
        log.info(
            "the default model knows none of this project's labels: no pre-labels until its first model",
            extra={"project": project, "model_version": model.version, "classes": list(model.names.values())},
        )
        return True

    def predict(
        self, project: str, tasks: list[Any], label_config: str
    ) -> tuple[str | None, list[TaskOutcome]]:
        try:
            controls = parse_label_config(label_config)
        except LabelConfigError as e:
            raise BadRequest(str(e)) from None
        model = self.model_for(project)  # one reference for the whole request, whatever swaps meanwhile
        if model is None:
            return None, [TaskOutcome(error="no model is loaded for this project") for _ in tasks]
        try:
            spec = select_output(controls, model.task, model.names)
        except LabelConfigError as e:
            if self._is_foreign_default(model, project):
                return None, [TaskOutcome(error=NO_MODEL_FOR_LABELS) for _ in tasks]
            raise BadRequest(str(e)) from None
        return model.version, self.predict_with(model, spec, project, tasks)

    def predict_with(
        self,
        model: LoadedModel,
        spec: OutputSpec,
        project: str,
        tasks: list[Any],
        embed: bool = False,
        batch_size: int | None = None,
    ) -> list[TaskOutcome]:
        """Predict ``tasks`` with one given model (the sync pins one for a whole run); see :meth:`predict`."""
        started = time.perf_counter()

        outcomes = [TaskOutcome() for _ in tasks]
        urls: dict[int, str] = {}
        for i, task in enumerate(tasks):
            try:
                urls[i] = task_image_url(task, spec.control)
            except ImageError as e:
                outcomes[i].error = str(e)
        # Label Studio sends every selected task in one request: fetch and predict in bounded chunks so
        # memory stays flat however many tasks arrive; each chunk is one batched model call.
        fetch_s = 0.0
        pending = list(urls.items())
        size = batch_size or self.settings.inference.batch_size
        for start in range(0, len(pending), size):
            chunk = pending[start : start + size]
            t = time.perf_counter()
            fetched = self.fetcher.fetch_many([url for _, url in chunk])
            fetch_s += time.perf_counter() - t
            images: dict[int, np.ndarray] = {}
            for (i, _), got in zip(chunk, fetched, strict=True):
                if isinstance(got, ImageError):
                    outcomes[i].error = str(got)
                else:
                    images[i] = got
            self.predict_images(model, spec, images, outcomes, embed)

        failed = [
            (task.get("id") if isinstance(task, dict) else None, o.error)
            for task, o in zip(tasks, outcomes, strict=True)
            if o.error
        ]
        for task_id, reason in failed:
            log.warning("task failed", extra={"project": project, "task": task_id, "reason": reason})
        log.info(
            "predict",
            extra={
                "project": project,
                "model_version": model.version,
                "tasks": len(tasks),
                "failed": len(failed),
                "fetch_ms": round(fetch_s * 1000, 1),
                "total_ms": round((time.perf_counter() - started) * 1000, 1),
            },
        )
        return outcomes
