"""Label efficiency: does annoloop's ranking reach a good model with fewer labels than random picks?

The loop is simulated offline with the project's own code (see ``bench/al_sim.py``): start from a small
random labeled set, then each cycle a strategy orders the unlabeled pool, its first ``batch`` images are
"labeled" from ground truth, the model is retrained with the project's training code, and scored on a fixed
test set. Every strategy gets the same initial set (per seed), the same training settings and budget, and
the same number of labels per cycle; only which images differs.

Reported per dataset: mAP50 / mAP50-95 / rare-class AP50 per strategy and cycle (mean over seeds), the
area under the learning curve, the labels needed to reach 90% / 95% of the full-pool model's mAP50 and to
reach random's final mAP50, and each strategy's paired difference to random with a bootstrap confidence
interval (seeds and test images resampled together, the same resample for both strategies). Plus a cheap
proxy: the share of the cycle-0 model's actual errors on the pool (missed and false pre-label boxes at IoU
0.5) that falls in the top 10% / 20% of each strategy's order, against random's expected share.

    .venv/bin/python bench/label_efficiency.py --quick                  # CI smoke run, a minute or two
    .venv/bin/python bench/label_efficiency.py --preset cpu             # what fits a 2-core CPU
    .venv/bin/python bench/label_efficiency.py                          # the full run (for a GPU)
    .venv/bin/python bench/label_efficiency.py --proxy-only --seeds 0,1,2
    .venv/bin/python bench/label_efficiency.py --merge a.json b.json --name label_efficiency

Outputs ``<out>/<name>.{json,md,png}`` (default ``bench/results/label_efficiency``); trained weights are
cached under ``--workdir`` (outside the repository), so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

os.environ.setdefault("YOLO_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from bench import al_sim
from bench.al_sim import (
    STRATEGIES,
    BenchData,
    ImageStore,
    Item,
    PoolView,
    TestMatches,
    TrainConfig,
    auc,
    labels_to_reach,
    order_pool,
    pick_stats,
    predict,
    score_pool,
    stable_hash,
    train_model,
)
from bench.hard_shapes import CLASSES as HARD_CLASSES
from bench.hard_shapes import RARE_CLASS as HARD_RARE
from bench.hard_shapes import HardShapesSpec, generate
from config.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
BCCD_ROOT = ROOT.parent / "shared" / "datasets" / "bccd" / "BCCD"
DEFAULT_WORKDIR = Path.home() / ".cache" / "annoloop" / "bench" / "label_efficiency"
STARTER_CACHE = Path(
    os.environ.get("ANNOLOOP_TEST_CACHE", Path.home() / ".cache" / "annoloop" / "test-models")
)
DATASETS = ("bccd", "generated")
#: Proxy-only orders (not simulated as strategies): which signal finds the errors, and the ceiling.
#: ``uncertainty_top`` is the configured combined uncertainty alone (no k-center, no rare-class term);
#: ``oracle`` sorts by the errors themselves, the most any order can put in its top k.
DIAGNOSTICS = (
    "uncertainty_top",
    "margin",
    "confidence_variance",
    "detection_count",
    "default_no_explore",
    "oracle",
)
#: Configuration changes tried in the proxy (config/default.yaml keys, not code):
#: name -> (uncertainty settings overrides, sync.ranking overrides, ranked by ``rank`` or by u alone).
#: ``previous_uncertainty`` is the uncertainty configuration before the benchmark's evidence changed it.
VARIANTS: dict[str, tuple[dict[str, Any], dict[str, Any], bool]] = {
    "default[previous_uncertainty]": ({"top_k": 3, "weights": {"confidence_variance": 0.5}}, {}, True),
    "uncertainty_top[previous_uncertainty]": (
        {"top_k": 3, "weights": {"confidence_variance": 0.5}},
        {},
        False,
    ),
    "uncertainty_top[top_k=100]": ({"top_k": 100}, {}, False),
    "default[top_k=100]": ({"top_k": 100}, {}, True),
}
ALL_STRATEGIES: tuple[str, ...] = STRATEGIES


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class DatasetPlan:
    """One dataset's loop: initial labeled set, batch per cycle, number of cycles, how models train."""

    name: str
    n_init: int
    batch: int
    cycles: int
    train: TrainConfig
    hard: HardShapesSpec | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "n_init": self.n_init,
            "batch": self.batch,
            "cycles": self.cycles,
            "train": {**asdict(self.train), "extra": {"nbs": self.train.batch, **dict(self.train.extra)}},
            "generated_spec": asdict(self.hard) if self.hard else None,
        }


def presets(device: str) -> dict[str, dict[str, DatasetPlan]]:
    """quick: CI smoke test. cpu: the largest loop a 2-core CPU runs in about an hour per dataset.
    full: for a GPU (imgsz and epochs closer to the project's defaults)."""
    gen_full = HardShapesSpec()
    gen_quick = HardShapesSpec(n_pool=48, n_test=24, width=96, height=72, burst_min=3, burst_max=4)
    return {
        "quick": {
            "generated": DatasetPlan(
                "generated", 8, 8, 2, TrainConfig(64, 2, 1, batch=4, device=device), gen_quick
            ),
            "bccd": DatasetPlan("bccd", 10, 10, 2, TrainConfig(128, 2, 1, batch=4, device=device)),
        },
        "cpu": {
            "bccd": DatasetPlan("bccd", 20, 20, 5, TrainConfig(256, 30, 4, batch=4, device=device)),
            "generated": DatasetPlan(
                "generated", 30, 30, 5, TrainConfig(160, 30, 5, batch=4, device=device), gen_full
            ),
        },
        "full": {
            "bccd": DatasetPlan("bccd", 20, 20, 5, TrainConfig(416, 60, 15, batch=8, device=device)),
            "generated": DatasetPlan(
                "generated", 30, 30, 5, TrainConfig(160, 60, 15, batch=8, device=device), gen_full
            ),
        },
    }


@dataclass
class RunOptions:
    strategies: list[str]
    seeds: list[int]
    workdir: Path
    bootstrap: int = 1000
    proxy_only: bool = False
    full_pool_seeds: int = 1
    #: Epochs of the full-pool reference's base run (None: the plan's base_epochs).
    full_epochs: int | None = None
    log: bool = True
    #: Only re-evaluate cached models (re-render a report with new statistics); never train.
    cached_only: bool = False


# --------------------------------------------------------------------------- data


def load_dataset(plan: DatasetPlan, workdir: Path, bccd_root: Path) -> BenchData:
    if plan.name == "bccd":
        if not (bccd_root / "Annotations").is_dir():
            raise SystemExit(f"BCCD not found at {bccd_root} (expected the VOC folder BCCD/)")
        return al_sim.load_bccd(bccd_root)
    spec = plan.hard or HardShapesSpec()
    pool, test = generate(workdir / "data", spec, seed=0)

    def items(rows: Sequence[Any]) -> list[Item]:
        return list(rows)  # the generator's images are already the simulation's Item type

    return BenchData(
        "generated",
        HARD_CLASSES,
        HARD_RARE,
        items(pool),
        items(test),
        f"generated hard shapes ({spec.width}x{spec.height}): pool {len(pool)} ({spec.burst_share:.0%} in "
        f"near-duplicate bursts, {spec.shifted_share_pool:.0%} of scenes dark/noisy, {spec.rare_share_pool:.0%} "
        f"with a star), test {len(test)} ({spec.shifted_share_test:.0%} dark, {spec.rare_share_test:.0%} with a star)",
    )


def starter_weights() -> Path:
    """The project's default model (generated shapes, trained once and cached): every run starts from it,
    as a project's first model is a base run from the served default model."""
    from training.bootstrap import TEST_RECIPES, cached_starter_model

    return cached_starter_model("detect", STARTER_CACHE, **TEST_RECIPES["detect"])


# --------------------------------------------------------------------------- the loop


@dataclass
class Evaluated:
    """A trained model's test matches and, when a strategy needs it, its scoring of the pool."""

    key: str
    weights: Path
    test: TestMatches
    view: PoolView | None


@dataclass
class Sim:
    plan: DatasetPlan
    data: BenchData
    opts: RunOptions
    starter: Path
    store: ImageStore = field(default_factory=ImageStore)
    trained: int = 0
    train_seconds: float = 0.0

    def __post_init__(self) -> None:
        self.settings = self.plan.train.settings(0)
        self.models = self.opts.workdir / "models" / self.plan.name
        self.base_key = stable_hash(
            {"v": al_sim.CACHE_VERSION, "plan": self.plan.to_dict(), "starter": self.starter.name}
        )

    def say(self, msg: str) -> None:
        if self.opts.log:
            print(f"[{time.strftime('%H:%M:%S')}] {self.plan.name}: {msg}", flush=True)

    def model(
        self,
        labeled: Sequence[int],
        parent: Evaluated | None,
        generation: int,
        seed: int,
        with_pool: bool,
        epochs: int | None = None,
    ) -> Evaluated:
        """Train (or reuse from the work folder) the model for this labeled set and history, and score it.

        ``epochs`` replaces the base run's epochs (the full-pool reference only)."""
        init = self.starter if parent is None or self.plan.train.mode == "retrain" else parent.weights
        init_key = "starter" if init == self.starter else parent.key if parent else "starter"
        parts: list[Any] = [self.base_key, init_key, sorted(int(i) for i in labeled), generation, seed]
        train = self.plan.train
        if epochs is not None and epochs != train.base_epochs:
            train = replace(train, base_epochs=epochs)
            parts.append({"base_epochs": epochs})
        key = stable_hash(parts)
        weights = self.models / f"{key}.pt"
        if not weights.exists():
            if self.opts.cached_only:
                raise RuntimeError(f"--cached-only: no trained model {weights.name} in the work folder")
            started = time.perf_counter()
            items = [self.data.pool[i] for i in labeled]
            tmp = weights.with_name(f".{key}.{os.getpid()}.tmp.pt")  # runs side by side may train the same
            train_model(
                items,
                self.data.classes,
                init=init,
                generation=generation,
                cfg=train,
                seed=seed,
                out=tmp,
            )
            tmp.replace(weights)
            self.trained += 1
            self.train_seconds += time.perf_counter() - started
        items = (self.data.pool if with_pool else []) + self.data.test
        dets = predict(weights, items, self.plan.train, self.store)
        n_pool = len(self.data.pool) if with_pool else 0
        test = al_sim.match_test(dets[n_pool:], self.data.test, len(self.data.classes))
        view = score_pool(dets[:n_pool], self.data, self.settings) if with_pool else None
        return Evaluated(key, weights, test, view)


def _rng(seed: int, *parts: int) -> np.random.Generator:
    return np.random.default_rng([seed, *parts])


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Rank correlation (ties broken by position; enough for a diagnostic)."""
    if len(a) < 2 or np.all(a == a[0]) or np.all(b == b[0]):
        return 0.0
    ra, rb = np.argsort(np.argsort(a, kind="stable")), np.argsort(np.argsort(b, kind="stable"))
    return float(np.corrcoef(ra, rb)[0, 1])


def _variant_settings(sim: Sim, unc_over: dict[str, Any]) -> Settings:
    base = sim.settings.uncertainty.model_dump()
    weights = base["weights"] | unc_over.get("weights", {})
    over = base | {k: v for k, v in unc_over.items() if k != "weights"} | {"weights": weights}
    return sim.settings.model_copy(update={"uncertainty": type(sim.settings.uncertainty)(**over)})


def proxy_orders(
    sim: Sim, view: PoolView, labeled: Sequence[int], seed: int, strategies: Sequence[str], errors: np.ndarray
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Each strategy's full order of the unlabeled pool (and the diagnostic orders), as pool indices, and
    the rank correlation between each score and the errors (what an order can find at best)."""
    data, settings, batch = sim.data, sim.settings, sim.plan.batch
    lab = set(labeled)
    unlabeled = np.array([i for i in range(len(data.pool)) if i not in lab], dtype=np.intp)
    err = errors[unlabeled]
    out: dict[str, np.ndarray] = {}
    rho: dict[str, float] = {}
    for s in strategies:
        out[s] = strategy_order(sim, s, view, labeled, seed, _rng(seed, 99, ALL_STRATEGIES.index(s)))
    u = np.array([view.rows[i].uncertainty for i in unlabeled], dtype=float)
    out["uncertainty_top"] = unlabeled[np.argsort(-u, kind="stable")]
    rho["uncertainty_top"] = _spearman(u, err)
    for name in ("least_confidence", "entropy", "margin", "confidence_variance", "detection_count"):
        cu = al_sim.component_uncertainty(view, settings, name)[unlabeled]
        rho[name] = _spearman(cu, err)
        if name not in ("least_confidence", "entropy"):
            out[name] = unlabeled[np.argsort(-cu, kind="stable")]
    for name, over in (("default_no_explore", {"exploration_fraction": 0.0}),):
        out[name] = order_pool(
            "default", view, labeled, data, settings, batch=batch, seed=seed, rng=_rng(seed, 98),
            ranking_overrides=over,
        )  # fmt: skip
    for name, (unc_over, rank_over, use_rank) in VARIANTS.items():
        vs = _variant_settings(sim, unc_over)
        vview = score_pool(view.dets, data, vs)
        vu = np.array([vview.rows[i].uncertainty for i in unlabeled], dtype=float)
        rho[name] = _spearman(vu, err)
        if use_rank:
            out[name] = order_pool(
                "default", vview, labeled, data, vs, batch=batch, seed=seed, rng=_rng(seed, 97),
                ranking_overrides=rank_over,
            )  # fmt: skip
        else:
            out[name] = unlabeled[np.argsort(-vu, kind="stable")]
    out["oracle"] = unlabeled[np.argsort(-err, kind="stable")]
    return out, rho


def proxy(
    sim: Sim, m0: Evaluated, labeled: Sequence[int], seed: int, strategies: Sequence[str]
) -> dict[str, Any]:
    """Share of the model's pool errors (FN + FP of its pre-labels) in each order's top 10% / 20%."""
    assert m0.view is not None
    conf = sim.settings.inference.prelabel_conf
    fn_fp = np.zeros((len(sim.data.pool), 2), dtype=int)
    for i, (det, it) in enumerate(zip(m0.view.dets, sim.data.pool, strict=True)):
        fn_fp[i] = al_sim.image_errors(det, it, conf)
    errors = fn_fp.sum(axis=1).astype(float)
    lab = set(labeled)
    unlabeled = np.array([i for i in range(len(sim.data.pool)) if i not in lab], dtype=np.intp)
    total = errors[unlabeled].sum()
    n = len(unlabeled)
    orders, rho = proxy_orders(sim, m0.view, labeled, seed, strategies, errors)
    out: dict[str, Any] = {
        "pool_images": n,
        "errors": int(total),
        "fn": int(fn_fp[unlabeled, 0].sum()),
        "fp": int(fn_fp[unlabeled, 1].sum()),
        "errors_per_image": {"mean": float(errors[unlabeled].mean()), "sd": float(errors[unlabeled].std())},
        "spearman_with_errors": rho,
        "shares": {},
    }
    for name, order in orders.items():
        row = {}
        for q in (0.1, 0.2):
            k = max(1, round(q * n))
            row[f"top{round(q * 100)}"] = float(errors[order[:k]].sum() / total) if total else 0.0
            row[f"random{round(q * 100)}"] = k / n  # random's expected share: exactly k / n
        out["shares"][name] = row
    return out


def strategy_order(
    sim: Sim,
    strategy: str,
    view: PoolView | None,
    labeled: Sequence[int],
    seed: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """A simulated strategy's order of the unlabeled pool (see ``bench.al_sim.order_pool``)."""
    return order_pool(
        strategy, view, labeled, sim.data, sim.settings, batch=sim.plan.batch, seed=seed, rng=rng
    )


def run_seed(sim: Sim, seed: int) -> dict[str, Any]:
    plan, data = sim.plan, sim.data
    labeled0 = sorted(int(i) for i in _rng(seed, 11).choice(len(data.pool), plan.n_init, replace=False))
    m0 = sim.model(labeled0, None, 0, seed, with_pool=True)  # the proxy needs cycle 0's view of the pool
    s0 = al_sim.scores(m0.test)
    sim.say(f"seed {seed} cycle 0 ({len(labeled0)} labels): mAP50 {s0['mAP50']:.3f}")
    result: dict[str, Any] = {
        "seed": seed,
        "initial": labeled0,
        "proxy": proxy(sim, m0, labeled0, seed, sim.opts.strategies),
    }
    result["curves"] = {}
    if sim.opts.proxy_only:
        return result
    for strategy in sim.opts.strategies:
        k = ALL_STRATEGIES.index(strategy)  # by name, so a strategy's random stream never depends on the list
        labeled, parent = list(labeled0), m0
        rows = [{"cycle": 0, "labels": len(labeled), **s0, "picked": [], "picks": {}}]
        tests = [m0.test]
        for c in range(1, plan.cycles + 1):
            order = strategy_order(sim, strategy, parent.view, labeled, seed, _rng(seed, c, k))
            picked = [int(i) for i in order[: plan.batch]]
            labeled = labeled + picked
            parent = sim.model(labeled, parent, c, seed, with_pool=strategy != "random" and c < plan.cycles)
            sc = al_sim.scores(parent.test)
            rows.append(
                {
                    "cycle": c,
                    "labels": len(labeled),
                    **sc,
                    "picked": picked,
                    "picks": pick_stats(picked, data),
                }
            )
            tests.append(parent.test)
            sim.say(f"seed {seed} {strategy:<16} cycle {c} ({len(labeled)} labels): mAP50 {sc['mAP50']:.3f}")
        result["curves"][strategy] = {"rows": rows, "tests": tests}
    return result


def full_pool_model(sim: Sim, seed: int) -> dict[str, Any]:
    """The reference: a base run on the whole pool (what labeling everything gets with the same recipe),
    for ``full_epochs`` epochs (default: the base run's)."""
    epochs = sim.opts.full_epochs or sim.plan.train.base_epochs
    ev = sim.model(list(range(len(sim.data.pool))), None, 0, seed, with_pool=False, epochs=epochs)
    sc = al_sim.scores(ev.test)
    sim.say(
        f"full-pool model (seed {seed}, {len(sim.data.pool)} labels, {epochs} epochs): mAP50 {sc['mAP50']:.3f}"
    )
    return {"seed": seed, "epochs": epochs, **sc}


# --------------------------------------------------------------------------- statistics


def _bootstrap(
    per_seed: list[dict[str, Any]],
    strategies: Sequence[str],
    labels: np.ndarray,
    n_test: int,
    draws: int,
) -> dict[str, dict[str, Any]]:
    """Paired bootstrap of (strategy - random) in AUC of mAP50 and in final mAP50.

    One draw resamples the seeds and the test images with replacement and applies the same resample to
    both strategies, so the interval covers training noise (seeds) and test-set noise (images) while the
    pairing cancels what both share (initial set, test images).
    """
    if "random" not in strategies or draws <= 0:
        return {}
    rng = np.random.default_rng(12345)
    n_seeds = len(per_seed)
    point_w = np.ones(n_test)

    def curve(tests: list[TestMatches], w: np.ndarray) -> np.ndarray:
        return np.array([np.nanmean(al_sim.average_precision(t, w, (0,))[:, 0]) for t in tests])

    def stats(w: np.ndarray) -> dict[str, np.ndarray]:
        out = {}
        for s in strategies:
            a = np.zeros((n_seeds, 2))
            for j, r in enumerate(per_seed):
                y = curve(r["curves"][s]["tests"], w)
                a[j] = (auc(labels, y), y[-1])
            out[s] = a
        return out

    point = stats(point_w)
    samples = {s: [] for s in strategies if s != "random"}
    for _ in range(draws):
        seeds = rng.integers(n_seeds, size=n_seeds)
        w = rng.multinomial(n_test, np.full(n_test, 1.0 / n_test)).astype(float)
        st = stats(w)
        for s in samples:
            samples[s].append((st[s][seeds] - st["random"][seeds]).mean(axis=0))
    out = {}
    for s, vals in samples.items():
        arr = np.array(vals)
        d = (point[s] - point["random"]).mean(axis=0)
        lo, hi = np.percentile(arr, [2.5, 97.5], axis=0)
        out[s] = {
            "auc_map50": {
                "diff": float(d[0]),
                "ci95": [float(lo[0]), float(hi[0])],
                "p_le_0": float((arr[:, 0] <= 0).mean()),
            },
            "final_map50": {
                "diff": float(d[1]),
                "ci95": [float(lo[1]), float(hi[1])],
                "p_le_0": float((arr[:, 1] <= 0).mean()),
            },
        }
    return out


def summarise(
    plan: DatasetPlan,
    data: BenchData,
    per_seed: list[dict[str, Any]],
    full: list[dict[str, Any]],
    opts: RunOptions,
) -> dict[str, Any]:
    """The dataset's section of the results JSON: curves, summary per strategy, proxy, goal checks."""
    section: dict[str, Any] = {
        "dataset": data.name,
        "description": data.description,
        "classes": list(data.classes),
        "rare_class": data.rare_class,
        "pool_images": len(data.pool),
        "test_images": len(data.test),
        "plan": plan.to_dict(),
        "seeds": [r["seed"] for r in per_seed],
        "initial": [r["initial"] for r in per_seed],
    }
    # Proxy over seeds.
    names = list(per_seed[0]["proxy"]["shares"])
    prox: dict[str, Any] = {"per_seed": [r["proxy"] for r in per_seed], "mean": {}}
    for name in names:
        row = {}
        for key in ("top10", "top20", "random10", "random20"):
            row[key] = float(np.mean([r["proxy"]["shares"][name][key] for r in per_seed]))
        row["ratio10"] = row["top10"] / row["random10"]
        row["ratio20"] = row["top20"] / row["random20"]
        rhos = [r["proxy"]["spearman_with_errors"].get(name) for r in per_seed]
        row["spearman"] = None if None in rhos else float(np.mean(rhos))
        prox["mean"][name] = row
    prox["spearman_mean"] = {
        k: float(np.mean([r["proxy"]["spearman_with_errors"][k] for r in per_seed]))
        for k in per_seed[0]["proxy"]["spearman_with_errors"]
    }
    section["proxy"] = prox
    if opts.proxy_only:
        return section
    strategies = list(per_seed[0]["curves"])
    labels = np.array([row["labels"] for row in per_seed[0]["curves"][strategies[0]]["rows"]], dtype=float)
    full_map = float(np.mean([f["mAP50"] for f in full])) if full else float("nan")
    section["full_pool"] = {"runs": full, "mAP50": full_map, "labels": len(data.pool)}
    curves: dict[str, Any] = {}
    for s in strategies:
        rows = [r["curves"][s]["rows"] for r in per_seed]
        m50 = np.array([[row["mAP50"] for row in rr] for rr in rows])
        m95 = np.array([[row["mAP50-95"] for row in rr] for rr in rows])
        rare = np.array([[row["ap50_per_class"][data.rare_index] or 0.0 for row in rr] for rr in rows])
        curves[s] = {
            "labels": labels.tolist(),
            "mAP50": m50.tolist(),
            "mAP50-95": m95.tolist(),
            "rare_ap50": rare.tolist(),
            "ap50_per_class_final": np.mean(
                [[v or 0.0 for v in rr[-1]["ap50_per_class"]] for rr in rows], axis=0
            ).tolist(),
            "picks": [[{k: row[k] for k in ("cycle", "picks", "picked")} for row in rr] for rr in rows],
        }
    section["curves"] = curves
    random_final = float(np.mean(curves["random"]["mAP50"], axis=0)[-1]) if "random" in curves else None
    summary: dict[str, Any] = {}
    for s, cv in curves.items():
        mean50 = np.mean(cv["mAP50"], axis=0)
        summary[s] = {
            "auc_map50": float(np.mean([auc(labels, y) for y in cv["mAP50"]])),
            "auc_map50_95": float(np.mean([auc(labels, y) for y in cv["mAP50-95"]])),
            "final_map50": float(mean50[-1]),
            "final_map50_95": float(np.mean(cv["mAP50-95"], axis=0)[-1]),
            "final_rare_ap50": float(np.mean(cv["rare_ap50"], axis=0)[-1]),
            "auc_rare_ap50": float(np.mean([auc(labels, y) for y in cv["rare_ap50"]])),
            "labels_to_90_full": labels_to_reach(labels, mean50, 0.9 * full_map) if full else None,
            "labels_to_95_full": labels_to_reach(labels, mean50, 0.95 * full_map) if full else None,
            "labels_to_random_final": labels_to_reach(labels, mean50, random_final)
            if random_final is not None
            else None,
        }
        reach = summary[s]["labels_to_random_final"]
        summary[s]["share_of_random_labels"] = None if reach is None else reach / float(labels[-1])
    boot = _bootstrap(per_seed, strategies, labels, len(data.test), opts.bootstrap)
    for s, b in boot.items():
        summary[s]["vs_random"] = b
    section["summary"] = summary
    section["bootstrap_draws"] = opts.bootstrap
    d = summary.get("default")
    p = prox["mean"].get("default")
    section["goal"] = {
        "default_share_of_random_labels": None if d is None else d["share_of_random_labels"],
        "labels_goal_met": None
        if d is None or d["share_of_random_labels"] is None
        else d["share_of_random_labels"] <= 0.6,
        "default_proxy_ratio10": None if p is None else p["ratio10"],
        "proxy_goal_met": None if p is None else p["ratio10"] >= 2.5,
    }
    return section


# --------------------------------------------------------------------------- hardware and reports


def hardware(device: str) -> dict[str, Any]:
    import torch
    import ultralytics

    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    dev = device
    if device.startswith("cuda") and torch.cuda.is_available():
        dev = f"{device} ({torch.cuda.get_device_name(0)})"
    return {
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": dev,
        "torch": torch.__version__,
        "ultralytics": ultralytics.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def _fmt(v: float | None, nd: int = 3) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{nd}f}"


def _labels(v: float | None, budget: float) -> str:
    return f"not reached (>{budget:.0f})" if v is None else f"{v:.0f}"


def render_markdown(results: dict[str, Any]) -> str:
    hw = results["hardware"]
    lines = [
        f"# Label efficiency ({results['preset']})",
        "",
        f"Hardware: {hw['cpu']}, {hw['cpu_cores']} cores, torch device `{hw['device']}` "
        f"({hw['torch_threads']} torch threads), torch {hw['torch']}, ultralytics {hw['ultralytics']}. "
        f"Run of {results['finished']}, {results['seconds'] / 60:.0f} min wall.",
        "",
    ]
    for sec in results["datasets"].values():
        plan = sec["plan"]
        t = plan["train"]
        lines += [
            f"## {sec['dataset']}",
            "",
            f"{sec['description']}. Rare class: `{sec['rare_class']}`. Seeds: {sec['seeds']}. "
            f"Start {plan['n_init']} random labels, {plan['cycles']} cycles of {plan['batch']}. "
            f"Training: mode `{t['mode']}`, imgsz {t['imgsz']}, base run {t['base_epochs']} epochs, "
            f"fine-tunes {t['finetune_epochs']} epochs, batch {t['batch']}, {t['extra']}; from the cached "
            "starter model; same for every strategy.",
            "",
        ]
        if "summary" in sec:
            lines += _curve_tables(sec)
        lines += _proxy_table(sec)
    return "\n".join(lines) + "\n"


def _curve_tables(sec: dict[str, Any]) -> list[str]:
    full = sec["full_pool"]
    rare = sec["rare_class"]
    out = [
        f"Full-pool model ({full['labels']} labels, base run of "
        f"{', '.join(str(r.get('epochs', '?')) for r in full['runs'])} epochs): mAP50 {_fmt(full['mAP50'])}.",
        "",
        f"| strategy | cycle | labels | mAP50 | mAP50-95 | AP50 {rare} |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for s, cv in sec["curves"].items():
        m50, m95, ra = (np.asarray(cv[k]) for k in ("mAP50", "mAP50-95", "rare_ap50"))
        for c, n in enumerate(cv["labels"]):
            sd = f" ± {m50[:, c].std():.3f}" if len(m50) > 1 else ""
            out.append(
                f"| {s} | {c} | {n:.0f} | {m50[:, c].mean():.3f}{sd} | {m95[:, c].mean():.3f} | {ra[:, c].mean():.3f} |"
            )
    budget = sec["curves"][next(iter(sec["curves"]))]["labels"][-1]
    out += [
        "",
        f"| strategy | AUC mAP50 | AUC mAP50-95 | final mAP50 | final AP50 {rare} | labels to 90% full | "
        "labels to 95% full | labels to random's final (share) | ΔAUC vs random [95% CI] | Δfinal vs random [95% CI] |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s, m in sec["summary"].items():
        reach = m["labels_to_random_final"]
        share = "" if m["share_of_random_labels"] is None else f" ({m['share_of_random_labels']:.0%})"
        vs = m.get("vs_random")
        da = (
            f"{vs['auc_map50']['diff']:+.3f} [{vs['auc_map50']['ci95'][0]:+.3f}, {vs['auc_map50']['ci95'][1]:+.3f}]"
            if vs
            else "—"
        )
        df = (
            f"{vs['final_map50']['diff']:+.3f} [{vs['final_map50']['ci95'][0]:+.3f}, {vs['final_map50']['ci95'][1]:+.3f}]"
            if vs
            else "—"
        )
        out.append(
            f"| {s} | {m['auc_map50']:.3f} | {m['auc_map50_95']:.3f} | {m['final_map50']:.3f} | "
            f"{m['final_rare_ap50']:.3f} | {_labels(m['labels_to_90_full'], budget)} | "
            f"{_labels(m['labels_to_95_full'], budget)} | {_labels(reach, budget)}{share} | {da} | {df} |"
        )
    out += _composition_table(sec)
    g = sec["goal"]
    if "default" in sec["summary"]:
        share = g["default_share_of_random_labels"]
        out += [
            "",
            f"Goal (default reaches random's final mAP50 with <= 60% of its labels): "
            f"{'met' if g['labels_goal_met'] else 'NOT met'} "
            f"({'not reached within the budget' if share is None else f'{share:.0%} of the labels'}).",
        ]
    out.append("")
    return out


def _composition_table(sec: dict[str, Any]) -> list[str]:
    """What the strategies labeled, per batch (mean over cycles 1.. and seeds): the 'why' behind the curves."""
    rare = sec["rare_class"]
    generated = any(
        "shifted_images" in row["picks"] for cv in sec["curves"].values() for rr in cv["picks"] for row in rr
    )
    head = f"| strategy | boxes per image | {rare} boxes per batch | images with {rare} |"
    if generated:
        head += " dark/noisy images | distinct scenes |"
    out = ["", head, "|---|" + "---:|" * (head.count("|") - 2)]
    for s, cv in sec["curves"].items():
        rows = [row for rr in cv["picks"] for row in rr if row["cycle"] > 0]
        boxes = [sum(r["picks"]["boxes"].values()) / max(1, len(r["picked"])) for r in rows]
        line = (
            f"| {s} | {np.mean(boxes):.1f} | {np.mean([r['picks']['boxes'][rare] for r in rows]):.1f} | "
            f"{np.mean([r['picks']['rare_images'] for r in rows]):.1f} |"
        )
        if generated:
            line += (
                f" {np.mean([r['picks']['shifted_images'] for r in rows]):.1f} | "
                f"{np.mean([r['picks']['distinct_scenes'] for r in rows]):.1f} |"
            )
        out.append(line)
    return out


def _proxy_table(sec: dict[str, Any]) -> list[str]:
    p = sec["proxy"]
    per = p["per_seed"]
    errs = ", ".join(
        f"{r['errors']} ({r['fn']} FN + {r['fp']} FP; {r['errors_per_image']['mean']:.1f} ± "
        f"{r['errors_per_image']['sd']:.1f} an image)"
        if "errors_per_image" in r
        else f"{r['errors']} ({r['fn']} FN + {r['fp']} FP)"
        for r in per
    )
    out = [
        f"Proxy: cycle-0 model's errors on the {per[0]['pool_images']} unlabeled pool images, per seed: {errs}. "
        "Share of them in the top 10% / 20% of each order (mean over seeds); random's expected share is k/n.",
        "",
        "| order | top 10% share | x random | top 20% share | x random | Spearman(score, errors) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in p["mean"].items():
        tag = " (diagnostic)" if name in DIAGNOSTICS else " (config variant)" if name in VARIANTS else ""
        rho = p.get("spearman_mean", {}).get(name)
        out.append(
            f"| {name}{tag} | {r['top10']:.3f} | {r['ratio10']:.2f} | {r['top20']:.3f} | {r['ratio20']:.2f} | "
            f"{'' if rho is None else f'{rho:+.2f}'} |"
        )
    rnd = next(iter(p["mean"].values()))
    out += ["", f"(random: {rnd['random10']:.3f} / {rnd['random20']:.3f})"]
    if "oracle" in p["mean"]:
        ceiling = p["mean"]["oracle"]["ratio10"]
        out += [
            "",
            f"Ceiling: the oracle order (the errors themselves, sorted) puts {ceiling:.2f}x random's share in its "
            f"top 10%, so a 2.5x goal is {'within reach' if ceiling >= 2.5 else 'out of reach of any order'} "
            "on this dataset with errors counted per image.",
        ]
    g = sec.get("goal")
    if g and g.get("default_proxy_ratio10") is not None:
        out += [
            "",
            f"Goal (default's top 10% holds >= 2.5x random's errors): {'met' if g['proxy_goal_met'] else 'NOT met'} "
            f"({g['default_proxy_ratio10']:.2f}x).",
        ]
    elif "default" in p["mean"]:
        r = p["mean"]["default"]["ratio10"]
        out += [
            "",
            f"Goal (default's top 10% holds >= 2.5x random's errors): {'met' if r >= 2.5 else 'NOT met'} ({r:.2f}x).",
        ]
    out.append("")
    return out


def render_plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    secs = [s for s in results["datasets"].values() if "curves" in s]
    if not secs:
        return
    fig, axes = plt.subplots(len(secs), 3, figsize=(15, 4.2 * len(secs)), squeeze=False)
    colours = dict(zip(ALL_STRATEGIES, plt.get_cmap("tab10").colors, strict=False))
    for row, sec in zip(axes, secs, strict=True):
        for ax, key, title in zip(
            row,
            ("mAP50", "mAP50-95", "rare_ap50"),
            ("mAP50", "mAP50-95", f"AP50 {sec['rare_class']} (rare)"),
            strict=True,
        ):
            for s, cv in sec["curves"].items():
                y = np.asarray(cv[key])
                x = cv["labels"]
                lw = 2.6 if s in ("default", "random") else 1.4
                ax.plot(x, y.mean(axis=0), marker="o", ms=3, lw=lw, label=s, color=colours.get(s))
                if len(y) > 1:
                    ax.fill_between(x, y.min(axis=0), y.max(axis=0), alpha=0.12, color=colours.get(s))
            if key == "mAP50":
                full = sec["full_pool"]["mAP50"]
                for f, ls in ((0.9, ":"), (0.95, "--")):
                    ax.axhline(f * full, color="grey", ls=ls, lw=1, label=f"{f:.0%} of full pool")
            ax.set_title(f"{sec['dataset']}: {title}")
            ax.set_xlabel("labeled images")
            ax.grid(alpha=0.3)
        row[0].legend(fontsize=7)
    hw = results["hardware"]
    n_seeds = len(secs[0]["seeds"])
    fig.suptitle(
        f"label efficiency ({results['preset']}, {n_seeds} seed{'s' if n_seeds != 1 else ''}, mean and min-max) "
        f"on {hw['device']}: {hw['cpu']}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(results: dict[str, Any], out: Path, name: str) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{name}.json", "md": out / f"{name}.md", "png": out / f"{name}.png"}
    paths["json"].write_text(json.dumps(results, indent=1, default=float))
    paths["md"].write_text(render_markdown(results))
    render_plot(results, paths["png"])
    return paths


# --------------------------------------------------------------------------- main


def run(
    plans: Sequence[DatasetPlan], opts: RunOptions, *, preset: str, bccd_root: Path = BCCD_ROOT
) -> dict[str, Any]:
    started = time.perf_counter()
    starter = starter_weights()
    device = plans[0].train.device if plans else "cpu"
    results: dict[str, Any] = {
        "preset": preset,
        "hardware": hardware(device),
        "options": {**asdict(opts), "workdir": str(opts.workdir)},
        "datasets": {},
    }
    for plan in plans:
        t0 = time.perf_counter()
        data = load_dataset(plan, opts.workdir, bccd_root)
        sim = Sim(plan, data, opts, starter)
        sim.say(
            f"{len(data.pool)} pool / {len(data.test)} test images, strategies {opts.strategies}, seeds {opts.seeds}"
        )
        per_seed = [run_seed(sim, s) for s in opts.seeds]
        full = (
            [] if opts.proxy_only else [full_pool_model(sim, s) for s in opts.seeds[: opts.full_pool_seeds]]
        )
        section = summarise(plan, data, per_seed, full, opts)
        section["seconds"] = round(time.perf_counter() - t0, 1)
        section["trainings"] = sim.trained
        section["train_seconds"] = round(sim.train_seconds, 1)
        results["datasets"][plan.name] = section
    results["seconds"] = round(time.perf_counter() - started, 1)
    results["finished"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return results


def merge(paths: Sequence[Path]) -> dict[str, Any]:
    """Several runs' JSON (e.g. one per dataset, run side by side) as one report."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    out = dict(runs[0])
    out["datasets"] = {}
    for r in runs:
        out["datasets"].update(r["datasets"])
    out["seconds"] = max(r["seconds"] for r in runs)
    # Re-rendering one merged report keeps where its parts came from.
    out["merged_from"] = [m for r in runs for m in r.get("merged_from", [])] or [str(p) for p in paths]
    return out


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="tiny CI configuration (a smoke test, not a claim)")
    ap.add_argument(
        "--preset", choices=("quick", "cpu", "full"), default=None, help="default: full (quick with --quick)"
    )
    ap.add_argument("--seeds", default=None, help="comma-separated seeds (default 0,1,2; quick: 0)")
    ap.add_argument("--datasets", default=None, help=f"comma-separated, of {DATASETS} (quick: generated)")
    ap.add_argument(
        "--strategies",
        default=None,
        help=f"comma-separated, of {ALL_STRATEGIES} (default: all; quick: random,default)",
    )
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="folder for json/md/png")
    ap.add_argument("--name", default=None, help="output file stem (default label_efficiency[_quick])")
    ap.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="trained models and generated data")
    ap.add_argument("--bccd", type=Path, default=BCCD_ROOT, help="BCCD's VOC folder")
    ap.add_argument("--device", default=None, help="cpu, cuda:0 (default: cuda:0 when torch sees a GPU)")
    ap.add_argument("--cycles", type=int, default=None, help="override the preset's cycles")
    ap.add_argument("--base-epochs", type=int, default=None)
    ap.add_argument("--finetune-epochs", type=int, default=None)
    ap.add_argument("--imgsz", type=int, default=None, help="override every dataset's imgsz")
    ap.add_argument(
        "--mode", choices=("warm", "retrain"), default=None, help="training protocol (default warm)"
    )
    ap.add_argument("--bootstrap", type=int, default=None, help="bootstrap draws (default 1000; quick 100)")
    ap.add_argument(
        "--full-pool-seeds", type=int, default=1, help="seeds that train a full-pool reference model"
    )
    ap.add_argument("--proxy-only", action="store_true", help="only the cheap error-share proxy")
    ap.add_argument("--full-epochs", type=int, default=None, help="epochs of the full-pool reference model")
    ap.add_argument("--cached-only", action="store_true", help="never train: re-score cached models only")
    ap.add_argument("--merge", type=Path, nargs="+", default=None, help="merge result JSONs into one report")
    args = ap.parse_args(argv)

    preset = args.preset or ("quick" if args.quick else "full")
    quick = preset == "quick"
    name = args.name or ("label_efficiency_quick" if quick else "label_efficiency")
    if args.merge:
        results = merge(args.merge)
        paths = write_outputs(results, args.out, name)
        print(render_markdown(results))
        print(f"wrote {', '.join(str(p) for p in paths.values())}")
        return 0

    import torch

    device = args.device or ("cuda:0" if torch.cuda.is_available() else "cpu")
    table = presets(device)[preset]
    datasets = _csv(args.datasets) if args.datasets else (["generated"] if quick else list(DATASETS))
    strategies = (
        _csv(args.strategies) if args.strategies else (["random", "default"] if quick else list(STRATEGIES))
    )
    for d in datasets:
        if d not in DATASETS:
            ap.error(f"unknown dataset {d!r}, expected among {DATASETS}")
    for s in strategies:
        if s not in ALL_STRATEGIES:
            ap.error(f"unknown strategy {s!r}, expected among {ALL_STRATEGIES}")
    seeds = [int(s) for s in _csv(args.seeds)] if args.seeds else ([0] if quick else [0, 1, 2])
    plans = []
    for d in datasets:
        plan = table[d]
        train = plan.train
        if args.imgsz:
            train = replace(train, imgsz=args.imgsz)
        if args.base_epochs:
            train = replace(train, base_epochs=args.base_epochs)
        if args.finetune_epochs:
            train = replace(train, finetune_epochs=args.finetune_epochs)
        if args.mode:
            train = replace(train, mode=args.mode)
        plans.append(replace(plan, train=train, cycles=args.cycles or plan.cycles))
    opts = RunOptions(
        strategies=strategies,
        seeds=seeds,
        workdir=args.workdir.resolve(),
        bootstrap=args.bootstrap if args.bootstrap is not None else (100 if quick else 1000),
        proxy_only=args.proxy_only,
        full_pool_seeds=args.full_pool_seeds,
        cached_only=args.cached_only,
        full_epochs=args.full_epochs,
    )
    results = run(plans, opts, preset=preset, bccd_root=args.bccd)
    paths = write_outputs(results, args.out, name)
    print()
    print(render_markdown(results))
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
