import naive
import numpy as np
import pytest

from coincide_ray.select import greedy_mmd_order, rank_cluster
from coincide_ray.select.mmd import ClusterKernel


@pytest.mark.parametrize("seed", range(6))
def test_greedy_order_matches_naive(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 30))
    d = int(rng.integers(1, 12))
    sigma = float(rng.choice([0.5, 1.0, 2.0]))
    x = rng.standard_normal((n, d)) * rng.uniform(0.1, 1.5)
    assert list(greedy_mmd_order(x, sigma=sigma)) == naive.greedy(x, sigma, n)


@pytest.mark.parametrize("seed", range(4))
def test_density_matches_naive(seed):
    rng = np.random.default_rng(100 + seed)
    x = rng.standard_normal((int(rng.integers(1, 25)), 6)) * 0.4
    assert rank_cluster(x).density == pytest.approx(naive.density(x, 1.0), rel=1e-12)


def test_exact_duplicates_tie_to_lowest_position():
    rng = np.random.default_rng(7)
    base = rng.standard_normal((6, 5)) * 0.5
    x = base[[0, 1, 2, 1, 3, 0, 4, 5, 1, 2]]  # rows 1 == 3 == 8, 0 == 5, 2 == 9
    order = greedy_mmd_order(x)
    assert list(order) == naive.greedy(x, 1.0, len(x))
    seen = {}
    for position in order:  # copies of one row are always taken lowest position first
        key = x[position].tobytes()
        assert position > seen.get(key, -1)
        seen[key] = position


def test_all_rows_identical():
    x = np.ones((5, 3))
    assert list(greedy_mmd_order(x)) == [0, 1, 2, 3, 4]
    assert rank_cluster(x).density == 1.0


def test_prefix_consistency():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((200, 8)) * 0.3
    full = greedy_mmd_order(x)
    for m in (0, 1, 7, 60, 199, 200):
        assert np.array_equal(greedy_mmd_order(x, limit=m), full[:m])
    assert sorted(full) == list(range(200))


def test_blockwise_matches_in_memory():
    rng = np.random.default_rng(11)
    x = rng.standard_normal((300, 10)) * 0.4
    x[50] = x[10]  # duplicates must behave the same in both paths
    whole = ClusterKernel(x)
    blocked = ClusterKernel(x, memory_bytes=300 * 8 * 7)  # a few rows per block
    assert whole.in_memory and not blocked.in_memory
    assert np.array_equal(blocked.greedy_order(40), whole.greedy_order(40))
    assert blocked.density == pytest.approx(whole.density, rel=1e-12)


def test_tiny_clusters_and_limits():
    assert list(greedy_mmd_order(np.zeros((0, 4)))) == []
    assert list(greedy_mmd_order(np.ones((1, 4)))) == [0]
    # a limit past the cluster's size ranks every member, as the naive reference does
    assert list(greedy_mmd_order(np.eye(3), limit=10)) == naive.greedy(np.eye(3), 1.0, 3) == [0, 1, 2]
    assert np.isnan(rank_cluster(np.zeros((0, 4))).density)


def test_non_finite_row_is_named():
    x = np.zeros((5, 3))
    x[3, 1] = np.nan
    with pytest.raises(ValueError, match="row 3"):
        greedy_mmd_order(x)
    x[3, 1] = 0
    x[4, 0] = np.inf
    with pytest.raises(ValueError, match="row 4"):
        greedy_mmd_order(x)
