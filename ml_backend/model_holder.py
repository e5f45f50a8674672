"""The served model: one holder per project owns loading it and swapping it for a newer version.

Requests ask the holder for the current ``LoadedModel`` and keep that reference for the whole request, so a
swap never changes the model under a request in flight: the holder only replaces its reference once the new
model is loaded and warmed up. Projects served the same weights share one loaded model.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ultralytics import YOLO

from annoloop.model_store import ModelStore, ModelVersion
from config.settings import InferenceSettings
from ml_backend.inference import PREDICTORS, Detections, resolve_device, to_detections

log = logging.getLogger(__name__)


class LoadedModel:
    """A model in memory, ready to predict. Ultralytics predictors are not thread-safe: calls are serialised."""

    def __init__(self, mv: ModelVersion, settings: InferenceSettings):
        self.project = mv.project
        self.version = mv.version
        self.weights = mv.weights
        self._settings = settings
        self.device = resolve_device(settings.device)
        started = time.perf_counter()
        self._yolo = YOLO(str(mv.weights))
        self.task: str = self._yolo.task
        self.names: dict[int, str] = {int(k): str(v) for k, v in self._yolo.names.items()}
        self._lock = threading.Lock()
        self.predict([np.full((64, 64, 3), 114, np.uint8)])  # warm up before serving
        self.load_seconds = time.perf_counter() - started

    def predict(self, images: list[np.ndarray], embed: bool = False) -> list[Detections]:
        """One batched call over BGR images, down to the lower of the two confidence thresholds.

        ``embed`` also returns each image's pooled backbone features (for the sync's diversity ranking),
        taken from the same forward pass rather than a second one.
        """
        if not images:
            return []
        s = self._settings
        kwargs: dict[str, Any] = dict(iou=s.iou, max_det=s.max_det, device=self.device, verbose=False)
        kwargs["conf"] = min(s.uncertainty_conf, s.prelabel_conf)
        if s.imgsz:
            kwargs["imgsz"] = s.imgsz
        pooled: list[torch.Tensor] = []
        with self._lock:
            hook = self._embedding_layer().register_forward_hook(_pool_into(pooled)) if embed else None
            try:
                results = self._yolo.predict(images, predictor=PREDICTORS.get(self.task), **kwargs)
            finally:
                if hook is not None:
                    hook.remove()
        detections = [to_detections(r) for r in results]
        if embed:
            features = torch.cat(pooled).float().cpu().numpy() if pooled else np.zeros((0, 0), np.float32)
            if len(features) != len(detections):
                raise RuntimeError(f"{len(features)} embeddings for {len(detections)} images")
            for det, vec in zip(detections, features, strict=True):
                det.embedding = vec
        return detections

    def _embedding_layer(self) -> torch.nn.Module:
        """The last backbone layer of the network the predictor runs (ultralytics runs a fused deep copy)."""
        from ultralytics.nn.tasks import BaseModel

        predictor = self._yolo.predictor
        backend = getattr(predictor, "model", None)
        # AutoBackend keeps the torch network on its PyTorch backend (ultralytics 8.4), or on itself (older).
        root = getattr(getattr(backend, "backend", None), "model", None) or getattr(backend, "model", None)
        net = root if isinstance(root, BaseModel) else None
        if net is None:
            raise RuntimeError(f"no ultralytics network found in {type(root).__name__}")
        layers = net.model
        backbone = len((getattr(net, "yaml", None) or {}).get("backbone") or []) or len(layers) - 1
        return layers[min(backbone, len(layers)) - 1]

    def describe(self) -> dict[str, Any]:
        return {
            "model_version": self.version,
            "task": self.task,
            "classes": list(self.names.values()),
            "device": self.device,
            "source_project": self.project,
        }


def _pool_into(out: list[torch.Tensor]) -> Callable[..., None]:
    """Forward hook: global-average-pool a (B, C, H, W) feature map into (B, C)."""

    def hook(_module: torch.nn.Module, _inputs: Any, output: Any) -> None:
        x = output[0] if isinstance(output, (list, tuple)) else output
        out.append(x.detach().float().mean(dim=(2, 3)) if x.dim() == 4 else x.detach().float().flatten(1))

    return hook


Loader = Callable[[ModelVersion], LoadedModel]


class ModelHolder:
    """Serves one project's model and swaps it when the project's version pointer moves.

    With the registry's watcher running, swaps happen in the watcher thread and ``get()`` only returns the
    current reference. Without it (in-process use), ``get()`` re-reads the pointer at most every
    ``check_interval_s`` and one request thread loads the new version while the others keep the old one.
    """

    def __init__(self, project: str, store: ModelStore, load: Loader, check_interval_s: float = 1.0):
        self.project = project
        self._store = store
        self._load = load
        self._interval = check_interval_s
        self._model: LoadedModel | None = None
        self._stamp: object = None
        self._checked = float("-inf")
        self._lock = threading.Lock()
        self.error: str | None = None

    watched = False  # set by the registry's watcher: it does the refreshing

    def get(self) -> LoadedModel | None:
        # Block only when nothing is loaded yet; otherwise let one thread load while the rest serve.
        due = (not self.watched or self._model is None) and time.monotonic() - self._checked >= self._interval
        if due and self._lock.acquire(blocking=self._model is None):
            try:
                self._refresh()
            finally:
                self._lock.release()
        return self._model

    def refresh(self) -> None:
        """Check the pointer now and swap if it moved (the watcher's entry point)."""
        with self._lock:
            self._refresh()

    def _refresh(self) -> None:
        stamp = self._store.pointer_stamp(self.project)
        self._checked = time.monotonic()
        if stamp == self._stamp:
            return
        mv = self._store.served(self.project)
        current = self._model
        previous = current.version if current else None
        if (
            mv is not None
            and current is not None
            and (current.project, current.version) == (mv.project, mv.version)
        ):
            self._stamp = stamp
            return
        try:
            # Load beside the old model, then swap the reference: requests in flight keep the old one.
            self._model = self._load(mv) if mv is not None else None
            self.error = None
            self._stamp = stamp
            del current  # the old model is freed once the last request using it finishes
            if mv is not None:
                log.info(
                    "model loaded",
                    extra={
                        "project": self.project,
                        "model_version": mv.version,
                        "previous": previous,
                    },
                )
        except Exception as e:  # keep serving what we had; retry on the next check
            self.error = f"cannot load {mv.weights if mv else '?'}: {type(e).__name__}: {e}"
            log.error("model load failed", extra={"project": self.project, "error": self.error})

    def status(self) -> dict[str, Any]:
        model = self._model
        out: dict[str, Any] = model.describe() if model else {"model_version": None}
        if self.error:
            out["error"] = self.error
        return out


class ModelRegistry:
    """All holders of this process, created on first use; identical weights are loaded once."""

    def __init__(self, store: ModelStore, settings: InferenceSettings, check_interval_s: float = 1.0):
        self.store = store
        self._settings = settings
        self._interval = check_interval_s
        self._holders: dict[str, ModelHolder] = {}
        self._loaded: weakref.WeakValueDictionary[tuple[Path, int], LoadedModel] = (
            weakref.WeakValueDictionary()
        )
        self._lock = threading.Lock()
        self._load_lock = threading.Lock()
        self._watching = False

    def _load(self, mv: ModelVersion) -> LoadedModel:
        key = (mv.weights.resolve(), mv.weights.stat().st_mtime_ns)
        with self._load_lock:
            model = self._loaded.get(key)
            if model is None:
                model = LoadedModel(mv, self._settings)
                self._loaded[key] = model
            return model

    def loaded_count(self) -> int:
        """Distinct models in memory: back to one per served version once the watcher has swapped (it collects
        the old model's reference cycles right after a swap)."""
        return len(self._loaded)

    def start_watcher(self) -> threading.Thread:
        """Poll every project's pointer in a background thread, so new versions load off the request path
        and are noticed within ``check_interval_s`` even when no request comes."""

        def watch() -> None:
            while True:
                time.sleep(self._interval)
                with self._lock:
                    known = set(self._holders)
                for project in set(self.store.projects()) - known:
                    self.holder(project)
                with self._lock:
                    holders = list(self._holders.values())
                swapped = False
                for h in holders:
                    before = h._model
                    try:
                        h.refresh()
                    except Exception:
                        log.exception("model watcher failed", extra={"project": h.project})
                    swapped |= h._model is not before
                    del before
                if swapped:
                    gc.collect()  # return the old model's memory now, not at some later collection
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()

        with self._lock:
            self._watching = True
            for h in self._holders.values():
                h.watched = True
        thread = threading.Thread(target=watch, name="model-watcher", daemon=True)
        thread.start()
        return thread

    def holder(self, project: str) -> ModelHolder:
        with self._lock:
            holder = self._holders.get(project)
            if holder is None:
                holder = self._holders[project] = ModelHolder(project, self.store, self._load, self._interval)
                holder.watched = self._watching
            return holder

    def status(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            holders = list(self._holders.values())
        return {h.project: h.status() for h in holders}
