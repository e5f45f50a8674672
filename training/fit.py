"""Train a candidate detection model with ultralytics: what to start from, for how long, at what rate.

The learning-rate policy: a project's first model is a *base run* (``training.base_epochs`` at
``training.lr0``), from the served model's weights when there is one (the default model counts: its
features transfer) or else from the architecture YAML (no download). Every later model is a *fine-tune* of
the project's current model on all its training tasks (old and new, so it does not forget), shorter
(``training.finetune_epochs``) and gentler: ``lr0 * lr_decay ** n`` for the project's ``n``-th version,
floored at ``lr_min``, because each version starts closer to where it should end up.

ultralytics' ``optimizer=auto`` would ignore ``lr0`` (it picks its own), so the optimizer is explicit.
The candidate is the *last* epoch's weights, never a "best" checkpoint chosen on the held-out split: the
held-out tasks must not influence training in any way, selection included.

Small projects (fewer training images than ultralytics' nominal batch, ``nbs`` 64) train with a smaller
batch and without gradient accumulation (unless ``training.train_args`` sets ``nbs``): ultralytics steps the optimizer once per ``nbs`` images, across
epochs, so 16 images in a batch of 16 would get one step every four epochs (an earlier label-efficiency bench
run on 20 BCCD images, 30 epochs at 256 px: mAP50 0.05 at batch 16 / nbs 64, 0.71 at batch 4 / nbs 4).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from config.settings import TrainingSettings
from training.dataset import Dataset

log = logging.getLogger(__name__)

#: ultralytics' nominal batch size: below this many training images a project counts as small.
NOMINAL_BATCH = 64

#: Arguments the job always sets itself; ``training.train_args`` cannot change them.
MANAGED_ARGS = frozenset(
    {"data", "model", "epochs", "imgsz", "batch", "lr0", "optimizer", "device", "workers", "seed", "amp"}
    | {"project", "name", "exist_ok", "plots", "resume", "pretrained"}
)

#: The training settings that shape a model (the rest schedule jobs): a change to one of them is a reason
#: to retrain even when no annotation changed.
MODEL_SETTINGS = frozenset(
    {"holdout_fraction", "model", "base_epochs", "finetune_epochs", "imgsz", "batch", "optimizer", "lr0"}
    | {"lr_decay", "lr_min", "seed", "promote_metric", "min_improvement", "train_args"}
)


@dataclass(frozen=True)
class RunPlan:
    """What one training run starts from and how it trains."""

    kind: Literal["scratch", "base", "finetune"]
    init: str  # weights path, or the architecture YAML for "scratch"
    epochs: int
    lr0: float
    generation: int  # how many versions of this project came before
    warmup_epochs: float | None  # None: ultralytics' default

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def plan_run(settings: TrainingSettings, parent_weights: Path | None, own_versions: int) -> RunPlan:
    """Base run for a project's first model, decayed fine-tunes after (see the module docstring)."""
    if own_versions > 0 and parent_weights is not None:
        lr = max(settings.lr_min, settings.lr0 * settings.lr_decay**own_versions)
        # No warm-up: its high bias learning rate would shake weights that are already good.
        return RunPlan("finetune", str(parent_weights), settings.finetune_epochs, lr, own_versions, 0.0)
    if parent_weights is not None:
        return RunPlan("base", str(parent_weights), settings.base_epochs, settings.lr0, 0, None)
    return RunPlan("scratch", settings.model, settings.base_epochs, settings.lr0, 0, None)


def small_set_batch(settings: TrainingSettings, train_images: int | None) -> tuple[int, int | None]:
    """(batch, nbs) for a training split of ``train_images``: the configured batch and ultralytics' own
    ``nbs`` for a big split; for a small one about four batches an epoch and one optimizer step each
    (``nbs`` = batch). A ``training.train_args`` that sets ``nbs`` has taken the step arithmetic in hand:
    then the configured batch stays too (a smaller batch under the same nbs would mean fewer steps)."""
    if train_images is None or train_images >= NOMINAL_BATCH or "nbs" in settings.train_args:
        return settings.batch, None
    batch = min(settings.batch, max(2, train_images // 4))
    return batch, batch


def train_args(
    settings: TrainingSettings,
    plan: RunPlan,
    dataset: Dataset,
    device: str,
    runs: Path,
    train_images: int | None = None,
) -> dict[str, Any]:
    """The keyword arguments of ``YOLO.train`` for this run (pure, so the model card can record them).

    ``train_images``: size of the training split (default: the dataset's), for the small-project batch."""
    if train_images is None:
        train_images = len(getattr(dataset, "train_ids", None) or []) or None
    batch, nbs = small_set_batch(settings, train_images)
    args: dict[str, Any] = {
        "val": False,  # per-epoch validation would run on the held-out split; we evaluate separately
        "patience": 10**6,  # nothing to stop on without validation: the configured epochs are the contract
        "cache": False,
        "verbose": False,
        "deterministic": True,
    }
    if plan.warmup_epochs is not None:
        args["warmup_epochs"] = plan.warmup_epochs
    if nbs is not None:
        args["nbs"] = nbs
    args.update({k: v for k, v in settings.train_args.items() if k not in MANAGED_ARGS})
    args.update(
        data=str(dataset.data_yaml),
        epochs=plan.epochs,
        imgsz=settings.imgsz,
        batch=batch,
        lr0=plan.lr0,
        optimizer=settings.optimizer,
        device=device,
        workers=settings.workers,
        seed=settings.seed,
        amp=settings.amp and device.startswith("cuda"),
        project=str(Path(runs).resolve()),  # absolute: otherwise ultralytics writes under its runs_dir
        name="train",
        exist_ok=True,
        plots=False,  # plots download a font
    )
    if plan.kind == "scratch":
        args["pretrained"] = False  # never try to fetch weights; with a .pt this would drop the weights
    return args


EpochCallback = Callable[[int, int], None]


def model_task(weights: Path) -> str:
    """The ultralytics task of a weights file: "detect", "segment", "classify", ..."""
    os.environ.setdefault("YOLO_OFFLINE", "1")
    from ultralytics import YOLO

    return str(YOLO(str(weights)).task)


def train_candidate(args: dict[str, Any], init: str, on_epoch: EpochCallback | None = None) -> Path:
    """Run ultralytics training; returns the last epoch's weights (optimizer state stripped)."""
    os.environ.setdefault("YOLO_OFFLINE", "1")
    from ultralytics import YOLO

    model = YOLO(init)
    if on_epoch is not None:

        def report(trainer: Any) -> None:
            try:
                on_epoch(int(trainer.epoch) + 1, int(trainer.epochs))
            except Exception:  # progress is informative; it must never stop training
                log.exception("progress callback failed")

        model.add_callback("on_train_epoch_end", report)
    model.train(**args)
    last = Path(model.trainer.last)
    if not last.is_file():
        raise RuntimeError(f"training finished without writing {last}")
    return last
