"""Unit tests for sync.ranking on constructed embeddings (no I/O, no wall-clock assertions).

Expected values are either hand-computed (arithmetic in the comments) or structural facts of the
construction (which group a point was generated in), never recomputed with the code under test.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from sync.ranking import (
    Labeled,
    Pool,
    Ranking,
    RankingConfig,
    class_rarity,
    kcenter_greedy,
    kmeans,
    rank,
)

D = 32


def groups(n_groups: int, per: int, noise: float = 1e-3, seed: int = 0, d: int = D) -> np.ndarray:
    """(n_groups * per, d) tight groups of near-duplicates; row r belongs to group r // per."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(n_groups, d))
    return np.repeat(centers, per, axis=0) + noise * rng.normal(size=(n_groups * per, d))


def no_labeled(d: int = D) -> Labeled:
    return Labeled(embeddings=np.zeros((0, d)))


# --------------------------------------------------------------------------- diversity


def test_near_duplicates_are_not_picked_together():
    n_groups, per = 10, 5
    emb = groups(n_groups, per)
    group = np.arange(n_groups * per) // per
    # Adversarial uncertainty: by priority alone all five copies of group 0 come first, then group 1 ...
    u = 0.99 - 0.01 * group - 0.001 * (np.arange(n_groups * per) % per)
    cfg = RankingConfig(
        batch_size=10,
        candidate_multiplier=5,
        exploration_fraction=0.0,
        diverse_batches=1,
        selection="kcenter",
    )
    r = rank(Pool(ids=np.arange(len(emb)), embeddings=emb, uncertainty=u), no_labeled(), cfg)
    first = r.order[:10]
    assert sorted(group[first].tolist()) == list(range(n_groups))
    assert set(r.source[first].tolist()) == {"k-center"}


def test_kcenter_stays_away_from_labeled_set():
    n_groups, per = 5, 4
    emb = groups(n_groups, per, seed=1)
    group = np.arange(n_groups * per) // per
    # Group 0 is the most uncertain but already labeled (same embeddings, up to the noise).
    u = np.where(group == 0, 0.95, 0.5) + 0.001 * np.arange(len(emb))
    labeled = Labeled(embeddings=emb[group == 0] + 1e-4)
    cfg = RankingConfig(
        batch_size=4, candidate_multiplier=5, exploration_fraction=0.0, diverse_batches=1, selection="kcenter"
    )
    r = rank(Pool(ids=np.arange(len(emb)), embeddings=emb, uncertainty=u), labeled, cfg)
    assert sorted(group[r.order[:4]].tolist()) == [1, 2, 3, 4]


def test_cold_start_covers_distinct_groups_by_diversity_only():
    n_groups, per = 6, 5
    emb = groups(n_groups, per, seed=2)
    group = np.arange(n_groups * per) // per
    # candidate_multiplier=1 would restrict to ids 0..5 (groups 0 and 1) if cold start used priority.
    cfg = RankingConfig(batch_size=6, candidate_multiplier=1, exploration_fraction=0.0, diverse_batches=2)
    r = rank(Pool(ids=np.arange(len(emb)), embeddings=emb), no_labeled(), cfg)
    assert np.all(r.priority == 0.0)
    assert sorted(group[r.order[:6]].tolist()) == list(range(n_groups))
    assert set(r.source[r.order[:12]].tolist()) == {"k-center"}
    assert set(r.source[r.order[12:]].tolist()) == {"priority"}


def test_cold_start_tail_continues_by_distance_to_covered_points():
    # Unit vectors at angles 0 (labeled), 10, 80, 40, 170, 120 degrees; squared chord distance to the
    # labeled point grows with the angle, so the tail must be 170, 120, 80, 40, 10 degrees.
    angles = np.deg2rad([10.0, 80.0, 40.0, 170.0, 120.0])
    emb = np.stack([np.cos(angles), np.sin(angles)], axis=1) * 3.0  # any scale
    labeled = Labeled(embeddings=np.array([[1.0, 0.0]]))
    cfg = RankingConfig(diverse_batches=0)
    r = rank(Pool(ids=np.arange(5), embeddings=emb), labeled, cfg)
    assert r.order.tolist() == [3, 4, 1, 2, 0]


# --------------------------------------------------------------------------- priority


@pytest.mark.parametrize("diverse_batches", [0, 3])
def test_rare_class_is_favoured(diverse_batches):
    # id 10 predicts class 0 (500 labeled boxes), id 11 class 1 (1 labeled box); equal uncertainty.
    pool = Pool(
        ids=np.array([10, 11]),
        embeddings=np.array([[1.0, 0.0], [0.0, 1.0]]),
        uncertainty=np.array([0.6, 0.6]),
        class_presence=np.array([[2.0, 0.0], [0.0, 1.0]]),
    )
    labeled = Labeled(embeddings=np.zeros((0, 2)), class_counts=np.array([500.0, 1.0]))
    on = rank(pool, labeled, RankingConfig(class_balance_weight=0.5, diverse_batches=diverse_batches))
    assert on.order.tolist() == [1, 0]
    assert on.priority[1] > on.priority[0]
    off = rank(pool, labeled, RankingConfig(class_balance_weight=0.0, diverse_batches=diverse_batches))
    assert off.priority[0] == off.priority[1]
    assert off.order.tolist() == [0, 1]  # tie -> smaller id first


def test_priority_hand_computed():
    # Uncertainty [0.9, 0.5, 0.1] -> percentile ranks [1, 0.5, 0].
    # class_counts [0, 3] -> 1/sqrt([1, 4]) = [1, 0.5], already max-normalised.
    # Rare term: row 0 has class 0 -> 1; row 1 class 1 -> 0.5; row 2 nothing -> 0.
    # priority = (1 * u + 0.5 * rare) / 1.5 = [1.5/1.5, 0.75/1.5, 0] = [1, 0.5, 0].
    pool = Pool(
        ids=np.arange(3),
        embeddings=np.eye(3),
        uncertainty=np.array([0.9, 0.5, 0.1]),
        class_presence=np.array([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]]),
    )
    labeled = Labeled(embeddings=np.zeros((0, 3)), class_counts=np.array([0.0, 3.0]))
    r = rank(pool, labeled, RankingConfig())
    assert r.priority == pytest.approx([1.0, 0.5, 0.0], abs=1e-12)
    # Cold start with class predictions: the rare term alone.
    cold = rank(Pool(pool.ids, pool.embeddings, None, pool.class_presence), labeled, RankingConfig())
    assert cold.priority == pytest.approx([1.0, 0.5, 0.0], abs=1e-12)


def test_priority_uses_uncertainty_ranks_not_scale():
    rng = np.random.default_rng(3)
    emb = rng.normal(size=(30, 8))
    u = rng.random(30)
    base = rank(Pool(np.arange(30), emb, u), no_labeled(8), RankingConfig())
    squashed = rank(Pool(np.arange(30), emb, u**4), no_labeled(8), RankingConfig())
    assert np.array_equal(base.priority, squashed.priority)
    # Without class predictions priority is the percentile rank: the most uncertain gets exactly 1.
    assert base.priority[np.argmax(u)] == 1.0 and base.priority[np.argmin(u)] == 0.0


def test_order_follows_uncertainty_when_diversity_is_irrelevant():
    n = 12
    rng = np.random.default_rng(4)
    u = rng.permutation(np.linspace(0.05, 0.95, n))
    # One-hot embeddings: every pair (and every pair with the labeled points) is equally far apart.
    emb = np.eye(16)[:n]
    labeled = Labeled(embeddings=np.eye(16)[n:])
    cfg = RankingConfig(batch_size=1, exploration_fraction=0.0, diverse_batches=3, selection="kcenter")
    r = rank(Pool(ids=np.arange(n), embeddings=emb, uncertainty=u), labeled, cfg)
    assert r.order.tolist() == np.argsort(-u).tolist()
    assert r.source[r.order[:3]].tolist() == ["k-center"] * 3


def test_priority_selection_heads_the_queue_by_priority_whatever_the_embeddings():
    """The default: the head batches are the highest-priority entries (near-duplicates included), the
    exploration share random; k-center would have spread the first batch over the groups instead."""
    n_groups, per, batch = 10, 5, 10
    emb = groups(n_groups, per)
    group = np.arange(n_groups * per) // per
    u = 0.99 - 0.01 * group - 0.001 * (np.arange(n_groups * per) % per)  # group 0 first, then group 1, ...
    cfg = RankingConfig(batch_size=batch, exploration_fraction=0.0, diverse_batches=2)
    assert cfg.selection == "priority"
    r = rank(Pool(ids=np.arange(len(emb)), embeddings=emb, uncertainty=u), no_labeled(), cfg)
    assert r.order.tolist() == list(range(n_groups * per))  # u strictly decreasing along the rows
    assert set(r.source.tolist()) == {"priority"}

    cfg = RankingConfig(batch_size=batch, exploration_fraction=0.2, diverse_batches=2, seed=3)
    r = rank(Pool(ids=np.arange(len(emb)), embeddings=emb, uncertainty=u), no_labeled(), cfg)
    for b in range(2):
        head = r.order[b * batch : (b + 1) * batch]
        assert (r.source[head] == "explore").sum() == 2
        picked = head[r.source[head] == "priority"]
        # Batch 1: rows 0..7; batch 2: the next 8 rows by priority not taken by batch 1's exploration.
        taken = set(r.order[: b * batch].tolist())
        expected = [i for i in range(n_groups * per) if i not in taken][:8]
        assert sorted(picked.tolist()) == expected


def test_cold_start_uses_kcenter_even_with_priority_selection():
    n_groups, per = 6, 4
    emb = groups(n_groups, per)
    group = np.arange(n_groups * per) // per
    r = rank(
        Pool(ids=np.arange(len(emb)), embeddings=emb),
        no_labeled(),
        RankingConfig(batch_size=6, exploration_fraction=0.0, diverse_batches=1),
    )
    assert sorted(group[r.order[:6]].tolist()) == list(range(n_groups))
    assert set(r.source[r.order[:6]].tolist()) == {"k-center"}


def test_unknown_selection_is_refused():
    with pytest.raises(ValueError, match="selection"):
        RankingConfig(selection="random")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- exploration


def test_exploration_fraction_is_honoured():
    n, batch, mult = 200, 10, 4
    rng = np.random.default_rng(5)
    emb = rng.normal(size=(n, 16))
    u = rng.permutation(n) / (n - 1)  # distinct: priority position = position by uncertainty
    top = set(np.argsort(-u)[: mult * batch].tolist())
    n_explore = round(0.2 * batch)
    outside_top, positions = 0, set()
    for seed in range(10):
        cfg = RankingConfig(
            batch_size=batch,
            candidate_multiplier=mult,
            exploration_fraction=0.2,
            diverse_batches=3,
            seed=seed,
            selection="kcenter",
        )
        r = rank(Pool(ids=np.arange(n), embeddings=emb, uncertainty=u), no_labeled(16), cfg)
        for b in range(3):
            src = r.source[r.order[b * batch : (b + 1) * batch]]
            assert (src == "explore").sum() == n_explore
            assert (src == "k-center").sum() == batch - n_explore
        assert (r.source == "explore").sum() == 3 * n_explore
        first = r.order[:batch]
        kc = first[r.source[first] == "k-center"]
        ex = first[r.source[first] == "explore"]
        assert set(kc.tolist()) <= top  # k-center only among the top M x batch
        outside_top += len(set(ex.tolist()) - top)
        positions.update(np.flatnonzero(r.source[first] == "explore").tolist())
    # Explore picks come from the whole remaining pool (160 of 192 entries lie outside the top 40) ...
    assert outside_top > 0
    # ... and land at random places in the batch, not always at its end.
    assert len(positions) > n_explore


def test_explore_picks_count_as_covered_for_later_batches():
    emb = groups(3, 5, seed=13)
    group = np.arange(15) // 5
    checked = 0
    for seed in range(20):
        # Cold start, batches of one k-center pick and one explore pick.
        cfg = RankingConfig(batch_size=2, exploration_fraction=0.5, diverse_batches=2, seed=seed)
        r = rank(Pool(ids=np.arange(15), embeddings=emb), no_labeled(), cfg)
        first, second = r.order[:2], r.order[2:4]
        kc1 = first[r.source[first] == "k-center"][0]
        ex1 = first[r.source[first] == "explore"][0]
        kc2 = second[r.source[second] == "k-center"][0]
        if group[kc1] != group[ex1]:
            # Both groups are covered, so the next k-center pick must open the third one.
            assert group[kc2] not in (group[kc1], group[ex1])
            checked += 1
    assert checked > 0


def test_no_exploration_when_fraction_is_zero():
    rng = np.random.default_rng(6)
    r = rank(
        Pool(np.arange(50), rng.normal(size=(50, 4)), rng.random(50)),
        no_labeled(4),
        RankingConfig(batch_size=10, exploration_fraction=0.0, selection="kcenter"),
    )
    assert "explore" not in set(r.source.tolist())
    assert (r.source == "k-center").sum() == 30


# --------------------------------------------------------------------------- scores, determinism, edges


def test_scores_follow_the_order():
    r = Ranking(
        order=np.array([2, 0, 3, 1]),
        cluster=np.zeros(4, dtype=int),
        priority=np.zeros(4),
        source=np.full(4, "priority"),
    )
    # Places: entry 2 -> 0, entry 0 -> 1, entry 3 -> 2, entry 1 -> 3; divided by n - 1 = 3.
    assert r.scores() == pytest.approx([1 / 3, 1.0, 0.0, 2 / 3])

    rng = np.random.default_rng(7)
    n = 37
    ranked = rank(Pool(np.arange(n), rng.normal(size=(n, 5)), rng.random(n)), no_labeled(5), RankingConfig())
    s = ranked.scores()
    assert s.shape == (n,)
    assert s[ranked.order[0]] == 0.0 and s[ranked.order[-1]] == 1.0
    assert np.all((s >= 0) & (s <= 1))
    assert np.all(np.diff(s[ranked.order]) > 0)


def test_scores_of_tiny_pools():
    one = rank(Pool(np.array([7]), np.ones((1, 3)), np.array([0.3])), no_labeled(3), RankingConfig())
    assert one.order.tolist() == [0] and one.scores().tolist() == [0.0]
    empty = rank(Pool(np.zeros(0, dtype=int), np.zeros((0, 3))), no_labeled(3), RankingConfig())
    assert empty.order.shape == (0,) and empty.scores().shape == (0,)
    assert empty.cluster.shape == (0,) and empty.source.shape == (0,)


def test_rank_is_a_deterministic_permutation():
    rng = np.random.default_rng(8)
    n = 150
    pool = Pool(
        ids=rng.permutation(1000)[:n],
        embeddings=rng.normal(size=(n, 12)),
        uncertainty=rng.random(n),
        class_presence=(rng.random((n, 4)) > 0.6).astype(float),
    )
    labeled = Labeled(embeddings=rng.normal(size=(20, 12)), class_counts=np.array([3.0, 0.0, 50.0, 7.0]))
    cfg = RankingConfig(seed=11)
    a, b = rank(pool, labeled, cfg), rank(pool, labeled, cfg)
    assert sorted(a.order.tolist()) == list(range(n))
    for field in ("order", "cluster", "priority", "source"):
        assert np.array_equal(getattr(a, field), getattr(b, field))
    # The seed only drives exploration (and k-means): other seeds give other explore picks.
    others = [rank(pool, labeled, RankingConfig(seed=s)).order for s in range(3)]
    assert any(not np.array_equal(a.order, o) for o in others)


def test_pool_smaller_than_a_batch_and_zero_norm_embeddings():
    emb = np.array([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 5.0, 0.0]])
    pool = Pool(ids=np.arange(4), embeddings=emb, uncertainty=np.array([0.1, 0.2, 0.3, 0.4]))
    r = rank(pool, Labeled(embeddings=np.zeros((1, 3))), RankingConfig(batch_size=20, clusters=8))
    assert sorted(r.order.tolist()) == [0, 1, 2, 3]
    assert np.all(np.isfinite(r.priority)) and np.all(np.isfinite(r.scores()))
    # The two zero vectors are identical: the second one comes only after every distinct point.
    assert sorted(r.order[:3].tolist()) in ([0, 1, 3], [1, 2, 3])
    # Three distinct points -> three clusters at most, the zero vectors together.
    assert len(set(r.cluster.tolist())) == 3 and r.cluster[0] == r.cluster[2]


# --------------------------------------------------------------------------- class_rarity


def test_class_rarity():
    # 1/sqrt(1 + [0, 3, 8]) = [1, 1/2, 1/3]; max is 1.
    assert class_rarity(np.array([0.0, 3.0, 8.0]), 3) == pytest.approx([1.0, 0.5, 1 / 3])
    # 1/sqrt(1 + [3, 8]) = [1/2, 1/3] / (1/2) = [1, 2/3].
    assert class_rarity(np.array([3, 8]), 2) == pytest.approx([1.0, 2 / 3])
    assert class_rarity(None, 4).tolist() == [1.0] * 4
    assert class_rarity(np.zeros(2), 2).tolist() == [1.0, 1.0]
    with pytest.raises(ValueError):
        class_rarity(np.array([1.0, 2.0]), 3)


# --------------------------------------------------------------------------- kcenter_greedy


def test_kcenter_hand_computed_farthest_first():
    # Points on a line 0, 1, 2, 10; anchor at 0. Farthest from {0}: 10 (index 3). Then distances to
    # {0, 10}: 1 -> 1, 2 -> 4, so 2 (index 2), then 1 (index 1), then the anchor's duplicate (index 0).
    x = np.array([[0.0], [1.0], [2.0], [10.0]])
    assert kcenter_greedy(x, 4, anchors=np.array([[0.0]])) == [3, 2, 1, 0]


def test_kcenter_skips_duplicates_and_anchors_while_distinct_points_remain():
    distinct = np.array([[0.0, 0.0], [5.0, 0.0], [0.0, 5.0], [5.0, 5.0]])
    x = np.repeat(distinct, 4, axis=0)  # row r is a copy of distinct[r // 4]
    picks = kcenter_greedy(x, 4)
    assert sorted(p // 4 for p in picks) == [0, 1, 2, 3]
    picks = kcenter_greedy(x, 3, anchors=distinct[:1])
    assert sorted(p // 4 for p in picks) == [1, 2, 3]
    # More than n requested: every index once.
    assert sorted(kcenter_greedy(x[:5], 50)) == [0, 1, 2, 3, 4]
    assert kcenter_greedy(np.zeros((0, 2)), 3) == []


def test_kcenter_recognises_exact_duplicates_at_any_scale():
    # Two 64-d sites at scale 1e3, three exact copies each, and one point 1e-5 from site b (row 6). The
    # expansion ||x||^2 - 2 x.y + ||y||^2 rounds off ~1e-8 there, more than that point's 1e-10 squared
    # distance: copies of a picked point must still count as exactly covered, so row 6 beats them.
    for seed in range(5):
        rng = np.random.default_rng(seed)
        a, b = rng.normal(size=(2, 64)) * 1e3
        near_b = b.copy()
        near_b[0] += 1e-5
        picks = kcenter_greedy(np.array([a] * 3 + [b] * 3 + [near_b]), 3)
        assert 6 in picks
        assert len({0, 1, 2} & set(picks)) == 1 and len({3, 4, 5} & set(picks)) == 1


def test_kcenter_never_builds_an_n_by_n_matrix():
    n, d, k = 20000, 16, 25
    x = np.random.default_rng(9).normal(size=(n, d))
    tracemalloc.start()
    try:
        picks = kcenter_greedy(x, k, anchors=x[:3] + 0.5)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(picks) == k and len(set(picks)) == k
    # An n x n float64 matrix is 3.2 GB (1.6 GB as float32); the traversal needs a few n x d arrays.
    assert peak < 100 * 2**20


# --------------------------------------------------------------------------- kmeans


def test_kmeans_recovers_separable_blobs():
    rng = np.random.default_rng(10)
    centers = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    truth = rng.permutation(np.repeat(np.arange(4), 50))
    x = centers[truth] + 0.3 * rng.normal(size=(200, 2))
    labels, found = kmeans(x, 4, seed=0)
    assert found.shape == (4, 2)
    # Same partition up to a relabelling: one label per true group, four different labels.
    mapping = {g: set(labels[truth == g].tolist()) for g in range(4)}
    assert all(len(v) == 1 for v in mapping.values())
    assert len(set().union(*mapping.values())) == 4


def test_kmeans_centers_are_cluster_means():
    # Two crosses of four points; each cross has its mean at its middle, which is no data point, so the
    # k-means++ seeds (data points) must have been moved by the Lloyd updates.
    cross = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    x = np.concatenate([cross, cross + 10.0])
    labels, centers = kmeans(x, 2, seed=0)
    assert sorted(map(tuple, centers.round(9).tolist())) == [(0.0, 0.0), (10.0, 10.0)]
    assert len(set(labels[:4].tolist())) == 1 and len(set(labels[4:].tolist())) == 1


def test_kmeans_is_deterministic_for_a_seed():
    x = np.random.default_rng(11).normal(size=(300, 6))
    a, ca = kmeans(x, 7, seed=3)
    b, cb = kmeans(x, 7, seed=3)
    assert np.array_equal(a, b) and np.array_equal(ca, cb)


def test_kmeans_with_more_clusters_than_distinct_points():
    distinct = np.array([[0.0, 1.0], [3.0, 3.0], [-2.0, 0.5]])
    x = np.tile(distinct, (4, 1))  # row r is distinct[r % 3]
    labels, centers = kmeans(x, 10, seed=0)
    assert centers.shape == (3, 2)
    assert len(set(labels.tolist())) == 3
    assert all(len(set(labels[np.arange(12) % 3 == i].tolist())) == 1 for i in range(3))
    assert sorted(map(tuple, centers.tolist())) == sorted(map(tuple, distinct.tolist()))
    empty_labels, empty_centers = kmeans(np.zeros((0, 2)), 3)
    assert empty_labels.shape == (0,) and empty_centers.shape == (0, 2)


def test_kmeans_memory_stays_below_n_by_k_by_d():
    n, d, k = 20000, 16, 128
    x = np.random.default_rng(12).normal(size=(n, d))
    tracemalloc.start()
    try:
        labels, centers = kmeans(x, k, seed=0, iters=2)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert labels.shape == (n,) and centers.shape == (k, d)
    # Broadcasting all n x k x d differences at once would take 328 MB.
    assert peak < 100 * 2**20
