"""One sync of one project: read the pool, score it (cached), rank it, write the queue order into Label Studio.

The order of writes is what keeps the queue sane if the sync dies half-way: predictions go in under a *new*
model version ``<model version>@<UTC time>``; only once all of them are in does the project's uncertainty
sampling point at it; only then are older annoloop versions deleted. Label Studio serves the task with the
lowest prediction score of the project's model version first, so a task's score is its place in the ranking
scaled to [0, 1]. Versions of that form are annoloop's; no other prediction and no annotation is touched.

A sync with no new task, no newly labeled task and no new model finds every task in the score cache and the
same ranking fingerprint as last time, and writes nothing (unless the project's settings drifted, e.g. a
reconnected ML backend reset its model version: those are always checked and fixed).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from annoloop.images import ImageError, ImageFetcher
from annoloop.labelstudio import LabelStudioAccess
from annoloop.locks import exclusive
from annoloop.model_store import DEFAULT_PROJECT, ModelStore, ModelVersion
from config.settings import Settings, load_settings
from ml_backend.label_config import Control, LabelConfigError, parse_label_config, select_output
from ml_backend.model_holder import LoadedModel
from ml_backend.predict_service import PredictService, TaskOutcome, task_image_url
from sync.features import FEATURES_VERSION, cheap_features
from sync.labelstudio_io import UNCERTAINTY_SAMPLING, ProjectIO, SyncError
from sync.ranking import Labeled, Pool, Ranking, RankingConfig, rank
from sync.score_cache import ScoreCache, Scored

log = logging.getLogger(__name__)

SYNC_DIR = "sync"
STATE_NAME = "state.json"
CACHE_NAME = "scores.sqlite"
LOCK_NAME = ".sync.lock"
#: annoloop's prediction versions: "<model version>@<UTC time>"; nothing else is ever deleted.
OURS = re.compile(r"^[A-Za-z0-9._-]+@\d{8}T\d{6}(?:\.\d{3})?Z$")

Progress = Callable[[str, int, int], None]  # (stage, done, total)


class SyncBusy(SyncError):
    """Another sync of this project is running."""


@dataclass
class SyncSummary:
    """What one sync did; printed by the CLI, returned by the queued job, logged."""

    project: str
    model_version: str  # the model that scored, or the cold-start prefix
    sync_version: str | None = None  # the prediction version now ordering the queue
    dry_run: bool = False
    cold_start: bool = False
    model_loaded: bool = False  # False when every task came from the cache
    labeled: int = 0
    pool: int = 0
    scored: int = 0
    from_cache: int = 0
    failed: dict[int, str] = field(default_factory=dict)
    written: int = 0
    unchanged: bool = False
    fixed_project_settings: bool = False
    deleted_versions: list[str] = field(default_factory=list)
    api_calls: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    top: list[dict[str, Any]] = field(default_factory=list)
    queue_labels: dict[str, int] = field(default_factory=dict)
    queue_clusters: dict[int, int] = field(default_factory=dict)
    plot: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def lines(self) -> list[str]:
        s = self
        head = f"project {s.project}: {'dry run, nothing written; ' if s.dry_run else ''}"
        out = [
            head
            + f"ranked {s.pool} unlabeled tasks ({s.labeled} labeled) with "
            + ("cheap image features (cold start, no model)" if s.cold_start else f"model {s.model_version}"),
            f"  scored {s.scored}, from cache {s.from_cache}, failed {len(s.failed)}; "
            f"{s.api_calls} Label Studio API calls; {s.seconds.get('total', 0):.1f} s "
            + "("
            + ", ".join(f"{k} {v:.1f}" for k, v in s.seconds.items() if k != "total")
            + ")",
        ]
        if s.dry_run:
            pass
        elif s.unchanged:
            out.append(f"  nothing changed since the last sync: queue still ordered by {s.sync_version}")
        else:
            out.append(
                f"  wrote {s.written} predictions as {s.sync_version}; queue = uncertainty sampling on it"
            )
        if s.fixed_project_settings:
            out.append("  the project's sampling / model version had drifted: set back")
        if s.deleted_versions:
            out.append(f"  deleted old annoloop prediction versions: {', '.join(s.deleted_versions)}")
        for task_id, reason in list(s.failed.items())[:10]:
            out.append(f"  task {task_id} skipped: {reason}")
        if len(s.failed) > 10:
            out.append(f"  ... and {len(s.failed) - 10} more skipped tasks")
        if s.top:
            out.append("  next to label (rank, task, score, uncertainty, cluster, why):")
            for i, t in enumerate(s.top, 1):
                u = "-" if t["uncertainty"] is None else f"{t['uncertainty']:.3f}"
                out.append(
                    f"    {i:>3}  {t['task']:>7}  {t['score']:.4f}  {u:>6}  {t['cluster']:>3}  {t['source']}"
                )
        if s.plot:
            out.append(f"  plot: {s.plot}")
        return out


def _no_progress(stage: str, done: int, total: int) -> None:
    return None


def _lock(path: Path) -> contextlib.AbstractContextManager[None]:
    return exclusive(path, lambda: SyncBusy(f"another sync of this project is running (lock {path})"))


def _read_state(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _write_state(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    os.replace(tmp, path)


def result_labels(result: list[dict[str, Any]]) -> dict[str, int]:
    """Regions per label in a Label Studio result (rectangles, polygons, choices)."""
    counts: Counter[str] = Counter()
    for region in result:
        value = region.get("value") or {}
        for key in ("rectanglelabels", "polygonlabels", "labels", "choices"):
            for label in value.get(key) or []:
                counts[str(label)] += 1
    return dict(counts)


def _latest_result(task: dict[str, Any]) -> list[dict[str, Any]]:
    from training.export import latest_annotation

    ann = latest_annotation(a if isinstance(a, dict) else dict(a) for a in task.get("annotations") or [])
    return list((ann or {}).get("result") or [])


def _image_control(label_config: str) -> Control:
    try:
        return parse_label_config(label_config)[0]
    except LabelConfigError as e:
        raise SyncError(f"the project's labeling config cannot be served: {e}") from None


def _stamp(now: datetime) -> str:
    return now.strftime("%Y%m%dT%H%M%S.") + f"{now.microsecond // 1000:03d}Z"


def _default_fits(served: ModelVersion, label_config: str) -> bool:
    """Whether a *default* model can label this project, from the classes its model card lists (a project's
    own model is trained on its labels; a card without classes is assumed to fit, as the backend will say)."""
    meta = served.metadata()
    classes = meta.get("classes")
    if served.project != DEFAULT_PROJECT or not classes:
        return True
    try:
        select_output(
            parse_label_config(label_config), str(meta.get("task", "detect")), dict(enumerate(classes))
        )
    except LabelConfigError:
        return False
    return True


class _Scorer:
    """Scores tasks with the served model, or with cheap features in the cold start, in batches.

    The model is loaded only when a task misses the cache: a re-sync with nothing new never pays for it.
    """

    def __init__(self, settings: Settings, project: str, label_config: str, fetcher: ImageFetcher):
        self.settings = settings
        self.fetcher = fetcher
        self.label_config = label_config
        self.served = ModelStore(settings.model_dir).served(project)
        if self.served is not None and not _default_fits(self.served, label_config):
            self.served = None  # a default model of other classes: nothing to score with, rank as cold start
        self.cold = self.served is None
        # The image a task is scored on (and cached by): the config's image field.
        self.control = _image_control(label_config)
        self._model: LoadedModel | None = None
        if self.served is None:
            self.version = settings.sync.cold_start_version
            self.cache_version = f"{self.version}:{FEATURES_VERSION}"
        else:
            self.version = self.cache_version = self.served.version

    def _loaded(self) -> tuple[LoadedModel, PredictService, Any]:
        if self._model is None:
            assert self.served is not None
            model = LoadedModel(self.served, self.settings.inference)
            try:
                self._spec = select_output(parse_label_config(self.label_config), model.task, model.names)
            except LabelConfigError as e:
                raise SyncError(
                    f"model {model.version} cannot fill this project's labeling config: {e}"
                ) from None
            self._service = PredictService(self.settings, registry=None, fetcher=self.fetcher)
            self._model = model
        return self._model, self._service, self._spec

    def image_of(self, task: dict[str, Any]) -> str:
        return task_image_url(task, self.control)

    def score(self, tasks: list[dict[str, Any]], project: str) -> tuple[list[Scored], dict[int, str]]:
        failed: dict[int, str] = {}
        scored: list[Scored] = []
        urls = [self.image_of(t) for t in tasks]
        images: dict[int, np.ndarray] = {}
        for i, (task, got) in enumerate(zip(tasks, self.fetcher.fetch_many(urls), strict=True)):
            if isinstance(got, ImageError):
                failed[task["id"]] = str(got)
            else:
                images[i] = got
        if self.cold:
            for i, image in images.items():
                scored.append(
                    Scored(tasks[i]["id"], urls[i], self.cache_version, None, cheap_features(image))
                )
            return scored, failed
        if not images:  # only unreadable images: no reason to load the model
            return scored, failed
        model, service, spec = self._loaded()
        outcomes = [TaskOutcome() for _ in tasks]
        service.predict_images(model, spec, images, outcomes, embed=True)
        for i in images:
            o = outcomes[i]
            if o.error or o.embedding is None:
                failed[tasks[i]["id"]] = o.error or "no embedding"
                continue
            scored.append(
                Scored(
                    tasks[i]["id"],
                    urls[i],
                    self.cache_version,
                    o.uncertainty,
                    o.embedding,
                    result_labels(o.result),
                    o.result,
                )
            )
        return scored, failed


def sync_project(
    project: str | int,
    settings: Settings | None = None,
    *,
    dry_run: bool = False,
    limit: int | None = None,
    plot: Path | None = None,
    top: int = 10,
    progress: Progress = _no_progress,
) -> SyncSummary:
    """Rank project ``project``'s unlabeled tasks and make Label Studio serve them in that order.

    Raises :class:`SyncError` (one line) when Label Studio, the key, the project or the model does not allow
    a sync; a task whose image cannot be read is skipped and reported, and the sync goes on.
    """
    settings = settings or load_settings()
    project = str(project)
    if not project.isdigit():
        raise SyncError(f"project must be a Label Studio project id, got {project!r}")
    store = ModelStore(settings.model_dir)
    sync_dir = store.pointer(project).parent / SYNC_DIR
    with _lock(sync_dir / LOCK_NAME):
        return _sync(project, settings, sync_dir, dry_run, limit, plot, top, progress)


def _sync(
    project: str,
    settings: Settings,
    sync_dir: Path,
    dry_run: bool,
    limit: int | None,
    plot: Path | None,
    top: int,
    progress: Progress,
) -> SyncSummary:
    cfg = settings.sync
    started = time.perf_counter()
    seconds: dict[str, float] = {}
    mark = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal mark
        now = time.perf_counter()
        seconds[name] = round(seconds.get(name, 0.0) + now - mark, 2)
        mark = now

    access = LabelStudioAccess(settings.label_studio)
    io = ProjectIO(access, int(project))
    info = io.project()
    fetcher = ImageFetcher(access, settings.images)
    try:
        scorer = _Scorer(settings, project, str(info.get("label_config") or ""), fetcher)
        summary = SyncSummary(project=project, model_version=scorer.version, dry_run=dry_run)
        summary.cold_start = scorer.cold
        lap("setup")

        with ScoreCache(sync_dir / CACHE_NAME) as cache:
            labeled_rows, labeled_counts = _score_labeled(io, scorer, cache, project, summary, progress)
            pool_rows = _score_pool(io, scorer, cache, project, summary, progress, limit)
            lap("score")
            if limit is None and not dry_run:
                cache.forget_except({r.task_id for r in labeled_rows} | {r.task_id for r in pool_rows})
    finally:
        fetcher.close()
    summary.model_loaded = scorer._model is not None
    summary.labeled, summary.pool = len(labeled_rows), len(pool_rows)

    ranking = _rank(pool_rows, labeled_rows, labeled_counts, cfg.ranking, cold=summary.cold_start)
    scores = ranking.scores()
    order = ranking.order
    summary.top = [
        {
            "task": pool_rows[i].task_id,
            "score": round(float(scores[i]), 6),
            "uncertainty": None
            if pool_rows[i].uncertainty is None
            else round(float(pool_rows[i].uncertainty), 4),
            "cluster": int(ranking.cluster[i]),
            "source": str(ranking.source[i]),
        }
        for i in order[:top]
    ]
    head = order[: max(cfg.ranking.batch_size * max(cfg.ranking.diverse_batches, 1), 1)]
    summary.queue_labels = dict(sum((Counter(pool_rows[i].labels) for i in head), Counter()))
    summary.queue_clusters = {int(k): int(v) for k, v in Counter(ranking.cluster[head].tolist()).items()}
    lap("rank")

    if plot is not None:
        from sync.plots import plot_sync

        summary.plot = str(plot_sync(plot, pool_rows, ranking, summary))

    if not dry_run:
        _write(io, cfg, sync_dir, pool_rows, ranking, labeled_rows, summary)
        lap("write")
    summary.api_calls = access.api_calls
    summary.seconds = {**seconds, "total": round(time.perf_counter() - started, 2)}
    log.info(
        "sync finished",
        extra={
            k: v
            for k, v in summary.to_dict().items()
            if k not in ("top", "failed", "queue_labels", "queue_clusters")
        }
        | {"failed": len(summary.failed)},
    )
    return summary


def _score_batches(
    tasks: list[dict[str, Any]],
    scorer: _Scorer,
    cache: ScoreCache,
    project: str,
    summary: SyncSummary,
) -> list[Scored]:
    """Scores of ``tasks`` (one page), from the cache where the same model saw the same image."""
    keys: list[tuple[int, str]] = []
    valid: list[dict[str, Any]] = []
    for t in tasks:
        try:
            keys.append((t["id"], scorer.image_of(t)))
            valid.append(t)
        except ImageError as e:
            summary.failed[t["id"]] = str(e)
    hits = cache.lookup(keys, scorer.cache_version)
    summary.from_cache += len(hits)
    misses = [t for t in valid if t["id"] not in hits]
    fresh: list[Scored] = []
    size = scorer.settings.sync.batch_size
    for start in range(0, len(misses), size):
        got, failed = scorer.score(misses[start : start + size], project)
        fresh += got
        summary.failed.update(failed)
    if fresh:
        cache.store(fresh)
    summary.scored += len(fresh)
    by_id = {**hits, **{r.task_id: r for r in fresh}}
    return [by_id[t["id"]] for t in valid if t["id"] in by_id]


def _pages(items: Iterator[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    page: list[dict[str, Any]] = []
    for item in items:
        page.append(item)
        if len(page) == size:
            yield page
            page = []
    if page:
        yield page


def _score_labeled(
    io: ProjectIO, scorer: _Scorer, cache: ScoreCache, project: str, summary: SyncSummary, progress: Progress
) -> tuple[list[Scored], Counter[str]]:
    """Embeddings of the labeled tasks (k-center keeps away from them) and their label counts (rarity)."""
    rows: list[Scored] = []
    counts: Counter[str] = Counter()
    page_size = scorer.settings.sync.page_size
    for page in _pages(io.tasks(labeled=True, page_size=page_size), page_size):
        for t in page:
            counts.update(result_labels(_latest_result(t)))
        slim = [{"id": t["id"], "data": t.get("data") or {}} for t in page]
        del page
        rows += _score_batches(slim, scorer, cache, project, summary)
        progress("labeled", len(rows), len(rows))
    return rows, counts


def _score_pool(
    io: ProjectIO,
    scorer: _Scorer,
    cache: ScoreCache,
    project: str,
    summary: SyncSummary,
    progress: Progress,
    limit: int | None,
) -> list[Scored]:
    rows: list[Scored] = []
    seen = 0
    page_size = scorer.settings.sync.page_size
    for page in _pages(io.tasks(labeled=False, page_size=page_size), page_size):
        if limit is not None:
            page = page[: max(limit - seen, 0)]
        seen += len(page)
        rows += _score_batches(
            [{"id": t["id"], "data": t.get("data") or {}} for t in page], scorer, cache, project, summary
        )
        progress("pool", seen, seen)
        if limit is not None and seen >= limit:
            break
    return rows


def _rank(
    pool_rows: list[Scored],
    labeled_rows: list[Scored],
    labeled_counts: Counter[str],
    ranking_settings: Any,
    cold: bool,
) -> Ranking:
    names = sorted(set(labeled_counts) | {k for r in pool_rows for k in r.labels})
    index = {n: i for i, n in enumerate(names)}
    dim = (pool_rows or labeled_rows)[0].embedding.shape[0] if (pool_rows or labeled_rows) else 1
    pool_emb = np.stack([r.embedding for r in pool_rows]) if pool_rows else np.zeros((0, dim), np.float32)
    lab_emb = (
        np.stack([r.embedding for r in labeled_rows]) if labeled_rows else np.zeros((0, dim), np.float32)
    )
    # Pooled activations share a large common component; centring makes distances about what differs.
    both = np.concatenate([pool_emb, lab_emb])
    centre = both.mean(axis=0) if len(both) else 0.0
    presence = np.zeros((len(pool_rows), max(len(names), 1)), np.float32)
    for i, r in enumerate(pool_rows):
        for label, n in r.labels.items():
            presence[i, index[label]] = n
    counts = np.array([labeled_counts.get(n, 0) for n in names] or [0], dtype=np.float32)
    return rank(
        Pool(
            ids=np.array([r.task_id for r in pool_rows], dtype=np.int64),
            embeddings=pool_emb - centre,
            uncertainty=None
            if cold
            else np.array([r.uncertainty or 0.0 for r in pool_rows], dtype=np.float64),
            class_presence=presence,
        ),
        Labeled(embeddings=lab_emb - centre, class_counts=counts),
        RankingConfig(**ranking_settings.model_dump()),
    )


def _fingerprint(summary: SyncSummary, pool_rows: list[Scored], labeled_rows: list[Scored], cfg: Any) -> str:
    payload = {
        "model": summary.model_version,
        "pool": sorted((r.task_id, r.image) for r in pool_rows),
        "labeled": sorted(r.task_id for r in labeled_rows),
        "ranking": cfg.ranking.model_dump(),
    }
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()


def _write(
    io: ProjectIO,
    cfg: Any,
    sync_dir: Path,
    pool_rows: list[Scored],
    ranking: Ranking,
    labeled_rows: list[Scored],
    summary: SyncSummary,
) -> None:
    state_path = sync_dir / STATE_NAME
    state = _read_state(state_path)
    fingerprint = _fingerprint(summary, pool_rows, labeled_rows, cfg)
    versions = io.model_versions()
    info = io.project()
    current = state.get("sync_version")
    if state.get("fingerprint") == fingerprint and current in versions:
        summary.unchanged, summary.sync_version = True, current
    elif pool_rows:
        version = f"{summary.model_version}@{_stamp(datetime.now(UTC))}"
        scores = ranking.scores()
        for start in range(0, len(pool_rows), cfg.import_chunk):
            # Built one chunk at a time: a large project never holds all its prediction JSON at once.
            chunk = [
                {
                    "task": r.task_id,
                    "model_version": version,
                    "score": float(scores[i]),
                    "cluster": int(ranking.cluster[i]),
                    "result": r.result,
                }
                for i, r in enumerate(pool_rows[start : start + cfg.import_chunk], start)
            ]
            summary.written += io.import_predictions(chunk, cfg.import_chunk)
        summary.sync_version = version
    else:
        summary.sync_version = current if current in versions else None
    if summary.sync_version and (
        info.get("model_version") != summary.sync_version or info.get("sampling") != UNCERTAINTY_SAMPLING
    ):
        summary.fixed_project_settings = summary.unchanged
        io.point_queue_at(summary.sync_version)
    io.ensure_view(cfg.view_title)
    # Delete older annoloop versions only now that the queue points at the new one.
    ours = sorted(
        (v for v in versions if OURS.match(v) and v != summary.sync_version), key=lambda v: v.split("@")[1]
    )
    keep = cfg.keep_versions - 1
    for v in ours[: len(ours) - keep] if keep else ours:
        io.delete_version(v)
        summary.deleted_versions.append(v)
    _write_state(
        state_path,
        {
            "sync_version": summary.sync_version,
            "model_version": summary.model_version,
            "fingerprint": fingerprint,
            "synced_at": datetime.now(UTC).isoformat(),
        },
    )
