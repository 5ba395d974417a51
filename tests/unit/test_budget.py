import warnings

import naive
import numpy as np
import pytest

from coincide_ray.select import allocate_budget
from coincide_ray.select.budget import visiting_order


def random_case(rng):
    k = int(rng.integers(1, 25))
    sizes = rng.integers(0, 40, size=k)
    scores = rng.normal(0, rng.choice([0.05, 0.3, 3.0]), size=k)
    budget = int(rng.integers(0, sizes.sum() + 1))
    return scores, sizes, budget, float(rng.choice([0.05, 0.1, 1.0]))


@pytest.mark.parametrize("seed", range(40))
def test_matches_naive(seed):
    scores, sizes, budget, tau = random_case(np.random.default_rng(seed))
    assert list(allocate_budget(scores, sizes, budget, temperature=tau)) == list(
        naive.allocate(scores, sizes, budget, tau)
    )


@pytest.mark.parametrize("seed", range(200))
def test_properties(seed):
    scores, sizes, budget, tau = random_case(np.random.default_rng(1000 + seed))
    quotas = allocate_budget(scores, sizes, budget, temperature=tau)
    assert (quotas >= 0).all() and (quotas <= sizes).all()
    assert quotas[sizes == 0].sum() == 0
    assert quotas.sum() <= budget
    order = visiting_order(scores, sizes)
    if quotas.sum() < budget:
        # Budget is only ever left over when the last cluster visited was capped.
        assert quotas[order[-1]] == sizes[order[-1]]
    if len(order) and sizes[order].min() >= budget:
        assert quotas.sum() == budget


def test_equal_scores_visit_lower_id_first():
    # Three equal clusters: 10 * 1/3 -> 3, then 7 * 1/2 = 3.5 -> 4 (half to even), then 3.
    quotas = allocate_budget(np.zeros(3), np.array([50, 50, 50]), 10, temperature=0.1)
    assert list(quotas) == [3, 4, 3]
    # 5 * 1/2 = 2.5 rounds to 2 for the lower id; the other takes the remaining 3.
    assert list(allocate_budget(np.ones(2), np.array([9, 9]), 5)) == [2, 3]


def test_shortfall_follows_design():
    # Equal scores, the small cluster visited last cannot take its half: 25 + 1 < 50.
    quotas = allocate_budget(np.zeros(2), np.array([100, 1]), 50)
    assert list(quotas) == [25, 1]


def test_large_scores_do_not_overflow():
    scores = np.array([1e6, 9.9e5, -1e6, 1e300])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quotas = allocate_budget(scores, np.array([10, 10, 10, 3]), 12, temperature=0.1)
    assert list(quotas) == [9, 0, 0, 3]


def test_zero_budget_and_empty():
    assert allocate_budget(np.array([1.0, 2.0]), np.array([3, 4]), 0).sum() == 0
    assert allocate_budget(np.zeros(0), np.zeros(0, np.int64), 0).shape == (0,)
    with pytest.raises(ValueError, match="temperature"):
        allocate_budget(np.zeros(2), np.ones(2, np.int64), 1, temperature=0)
