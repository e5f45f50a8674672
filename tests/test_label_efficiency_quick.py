"""Smoke test of the label-efficiency benchmark (bench/label_efficiency.py --quick) and of its strategies.

The quick run is a check that the harness works end to end (generate data, train with the project's
training code, score with the served-model path, rank with sync.ranking, evaluate, bootstrap, report), not
a claim about label efficiency: its models train for an epoch or two on a few dozen tiny images.
The strategy tests pin that each strategy orders the pool by its own signal, so a strategy that ignored
its scores (or a harness that handed it the wrong ones) fails here.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

from bench import al_sim
from ml_backend.inference import Detections

ROOT = Path(__file__).resolve().parents[1]


def _data(n: int) -> al_sim.BenchData:
    items = [
        al_sim.Item(f"img{i}", Path(f"/nonexistent/img{i}.jpg"), 100, 100, np.zeros((0, 4)), np.zeros(0, int))
        for i in range(n)
    ]
    return al_sim.BenchData("fake", ("a", "b", "c"), "c", items, [], "fabricated")


def _view(confidences: list[float], seed: int = 0) -> tuple[al_sim.PoolView, al_sim.BenchData]:
    """One box per image with the given confidence (class a), random embeddings."""
    rng = np.random.default_rng(seed)
    dets = []
    for c in confidences:
        dets.append(
            Detections(
                width=100,
                height=100,
                boxes=np.array([[10.0, 10.0, 40.0, 40.0]]),
                confidences=np.array([c]),
                classes=np.array([0]),
                class_scores=np.array([[c, 0.0, 0.0]]),
                embedding=rng.normal(size=16).astype(np.float32),
            )
        )
    data = _data(len(confidences))
    settings = al_sim.TrainConfig(64, 1, 1).settings(0)
    return al_sim.score_pool(dets, data, settings), data


def test_uncertainty_strategies_put_the_most_uncertain_image_first() -> None:
    # A box at 0.5 is a coin toss (most uncertain); 0.97 and 0.9 are sure. Index 3 must come first.
    confs = [0.97, 0.9, 0.8, 0.5, 0.95, 0.7, 0.96]
    view, data = _view(confs)
    settings = al_sim.TrainConfig(64, 1, 1).settings(0)
    for strategy in ("least_confidence", "entropy"):
        order = al_sim.order_pool(
            strategy, view, [], data, settings, batch=2, seed=0, rng=np.random.default_rng(0)
        )
        assert sorted(order.tolist()) == list(range(len(confs)))
        assert order[0] == 3, (strategy, order)
        assert order[1] == 5, (strategy, order)  # 0.7 is the next closest to a coin toss


def test_default_and_kcenter_strategies_pick_their_batch_among_the_most_uncertain() -> None:
    # 40 images, 8 of them uncertain (0.45-0.55), the rest sure. With batch 2 the default takes the top 2 by
    # priority, and kcenter picks among the top 4 x 2 = 8 by priority, so both picks must be uncertain
    # images either way; a ranking that ignored the scores would pick from all 40.
    rng = np.random.default_rng(1)
    confs = [float(c) for c in rng.uniform(0.93, 0.99, size=40)]
    uncertain = [3, 7, 11, 19, 23, 29, 31, 37]
    for i in uncertain:
        confs[i] = float(rng.uniform(0.45, 0.55))
    view, data = _view(confs)
    settings = al_sim.TrainConfig(64, 1, 1).settings(0)
    labeled = [0, 1]
    for strategy in ("default", "kcenter"):
        order = al_sim.order_pool(
            strategy, view, labeled, data, settings, batch=2, seed=0, rng=np.random.default_rng(0)
        )
        assert set(order.tolist()) == set(range(40)) - set(labeled)
        assert set(order[:2].tolist()) <= set(uncertain), (strategy, order[:2])
    # The default's first is the single most uncertain image (confidence nearest 0.5).
    first = al_sim.order_pool(
        "default", view, labeled, data, settings, batch=2, seed=0, rng=np.random.default_rng(0)
    )
    assert first[0] == min(uncertain, key=lambda i: abs(confs[i] - 0.5))
    rand = al_sim.order_pool(
        "random", None, labeled, data, settings, batch=2, seed=0, rng=np.random.default_rng(0)
    )
    assert set(rand.tolist()) == set(order.tolist())


def test_statistics() -> None:
    assert al_sim.labels_to_reach([10, 20, 30], [0.1, 0.3, 0.5], 0.4) == 25.0
    assert al_sim.labels_to_reach([10, 20, 30], [0.1, 0.3, 0.5], 0.6) is None
    assert al_sim.auc([10, 20, 30], [0.2, 0.4, 0.6]) == 0.4


def test_quick_run_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "results"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "label_efficiency.py"),
            "--quick",
            "--workdir",
            str(tmp_path / "work"),
            "--out",
            str(out),
            "--name",
            "quick",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| default | 2 |" in proc.stdout  # the table is printed too

    md = (out / "quick.md").read_text()
    for strategy in ("random", "default"):
        for cycle, labels in ((0, 8), (1, 16), (2, 24)):
            assert re.search(rf"^\| {strategy} \| {cycle} \| {labels} \| \d\.\d{{3}} \|", md, re.M), (
                strategy,
                cycle,
            )
    assert "Hardware:" in md and "x random" in md

    png = (out / "quick.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000

    res = json.loads((out / "quick.json").read_text())
    assert res["hardware"]["device"] == "cpu" or res["hardware"]["device"].startswith("cuda")
    sec = res["datasets"]["generated"]
    assert set(sec["curves"]) == {"random", "default"}
    for cv in sec["curves"].values():
        assert cv["labels"] == [8, 16, 24]
        for key in ("mAP50", "mAP50-95", "rare_ap50"):
            values = np.asarray(cv[key])
            assert values.shape == (1, 3) and np.all((values >= 0) & (values <= 1)), key
    for s, m in sec["summary"].items():
        assert math.isfinite(m["auc_map50"]) and 0 <= m["auc_map50"] <= 1, s
    vs = sec["summary"]["default"]["vs_random"]["auc_map50"]
    assert vs["ci95"][0] <= vs["diff"] <= vs["ci95"][1]

    # Every cycle labels `batch` new, distinct images, never the initial ones; strategies differ.
    initial = set(sec["initial"][0])
    assert len(initial) == 8
    picked = {}
    for s, cv in sec["curves"].items():
        cycles = cv["picks"][0]
        flat = [i for row in cycles for i in row["picked"]]
        assert len(flat) == len(set(flat)) == 16, s
        assert not set(flat) & initial
        picked[s] = flat
    assert picked["default"] != picked["random"]

    # Proxy: shares are fractions; no order beats the oracle (errors sorted); random's expectation is k/n.
    shares = sec["proxy"]["mean"]
    for name, row in shares.items():
        for key in ("top10", "top20"):
            assert 0.0 <= row[key] <= 1.0, (name, key)
            assert row[key] <= shares["oracle"][key] + 1e-9, (name, key)
    n = sec["proxy"]["per_seed"][0]["pool_images"]
    assert shares["random"]["random10"] == max(1, round(0.1 * n)) / n
