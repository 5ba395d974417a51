"""The paper's ablations as strategies, against naive definitions written here."""

import naive
import numpy as np
import pytest

from coincide_ray.select.selection import select_from_clusters
from coincide_ray.select.strategies import STRATEGIES, RankingTooShort, choose


def clustered(seed, n=90, k=7, layers=2, dim=16):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((k, dim))
    weights = 1.0 / np.arange(1, k + 1)  # Zipf-like sizes, so caps and shares matter
    assignments = np.concatenate([np.arange(k), rng.choice(k, n - k, p=weights / weights.sum())])
    rng.shuffle(assignments)
    x = centres[assignments] + 0.4 * rng.standard_normal((n, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    centroids = np.stack([x[assignments == c].mean(0) for c in range(k)])
    return x, assignments, centroids / np.linalg.norm(centroids, axis=1, keepdims=True), layers


@pytest.fixture(scope="module", params=[0, 1, 2])
def ranked(request):
    x, assignments, centroids, layers = clustered(request.param)
    full = select_from_clusters(x, assignments, centroids, num_layers=layers, fraction=0.3)
    return x, assignments, full


def pick(strategy, ranked, fraction=0.3, seed=0):
    _, assignments, full = ranked
    t = full.clusters
    return choose(strategy, rank=full.rank, assignments=assignments, transfer=t.transferability,
                  density=t.density, fraction=fraction, temperature=0.1, seed=seed)


def greedy_firsts(ranked, quotas):
    """Each cluster's first `quota` members in greedy order, from the naive greedy MMD."""
    x, assignments, _ = ranked
    chosen = []
    for c, q in enumerate(quotas):
        members = np.flatnonzero(assignments == c)
        if q:
            chosen += [members[p] for p in naive.greedy(x[members], 1.0, int(q))]
    return sorted(chosen)


def test_coincide_is_the_selection(ranked):
    _, _, full = ranked
    chosen = pick("coincide", ranked)
    assert np.array_equal(chosen.selected, full.selected) and np.array_equal(chosen.quota, full.clusters.quota)


@pytest.mark.parametrize("strategy, score", [
    ("no-transfer", lambda s, d: 1.0 / d),
    ("no-density", lambda s, d: s),
    ("uniform", lambda s, d: np.zeros_like(s)),
])
def test_ablations_score_the_clusters_as_the_paper_does(ranked, strategy, score):
    _, assignments, full = ranked
    t = full.clusters
    sizes = np.bincount(assignments, minlength=len(t.size))
    naive_scores = np.array([score(s, d) if n else np.nan for s, d, n in zip(t.transferability, t.density, sizes)])
    quotas = naive.allocate(naive_scores, sizes, int(0.3 * len(assignments)), 0.1)
    chosen = pick(strategy, ranked)
    assert np.array_equal(chosen.quota, quotas)
    assert chosen.selected.tolist() == greedy_firsts(ranked, quotas)


def test_uniform_gives_every_cluster_the_same_quota_unless_capped(ranked):
    _, assignments, _ = ranked
    chosen = pick("uniform", ranked)
    sizes = np.bincount(assignments)
    uncapped = chosen.quota[chosen.quota < sizes]
    assert len(uncapped) and uncapped.max() - uncapped.min() <= 1


def test_random_within_keeps_coincides_quotas_with_random_members(ranked):
    _, assignments, full = ranked
    chosen = pick("coincide-random-within", ranked)
    assert np.array_equal(np.bincount(assignments[chosen.selected], minlength=len(chosen.quota)),
                          full.clusters.quota)
    again = pick("coincide-random-within", ranked)
    other = pick("coincide-random-within", ranked, seed=7)
    assert np.array_equal(chosen.selected, again.selected) and not np.array_equal(chosen.selected, other.selected)


def test_random_draws_the_budget_from_every_record(ranked):
    _, assignments, _ = ranked
    chosen = pick("random", ranked)
    assert len(chosen.selected) == int(0.3 * len(assignments)) == chosen.budget
    assert len(set(chosen.selected.tolist())) == len(chosen.selected)
    assert not np.array_equal(chosen.selected, pick("random", ranked, seed=1).selected)


def test_every_strategy_is_known_and_a_short_ranking_is_one_line(ranked):
    assert set(STRATEGIES) == {"coincide", "random", "no-transfer", "no-density", "uniform", "coincide-random-within"}
    with pytest.raises(ValueError, match="unknown strategy"):
        pick("best", ranked)
    _, assignments, full = ranked
    cut = full.rank.copy()
    cut[cut >= 1] = -1  # as if every cluster had been ranked up to one member only
    t = full.clusters
    with pytest.raises(RankingTooShort, match="raise select.kernel_memory_mb"):
        choose("uniform", rank=cut, assignments=assignments, transfer=t.transferability, density=t.density,
               fraction=0.3, temperature=0.1)
