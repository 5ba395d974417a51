import naive
import numpy as np
import pytest

from coincide_ray.select import transferability
from coincide_ray.select.scoring import language_halves


@pytest.mark.parametrize("seed", range(6))
def test_matches_naive(seed):
    rng = np.random.default_rng(seed)
    layers = int(rng.integers(1, 4))
    k = int(rng.integers(1, 30))
    c = rng.standard_normal((k, 2 * layers * 4))
    c[: k // 3] = c[0] + 0.01 * rng.standard_normal(c.shape[1])  # some near-duplicates (> 0.9)
    expected = naive.transferability(c, layers, 0.9)
    assert np.allclose(transferability(c, num_layers=layers), expected, rtol=1e-12, atol=1e-14)
    assert np.allclose(transferability(c, num_layers=layers, block_rows=3), expected, rtol=1e-12, atol=1e-14)


def test_single_centroid_and_all_similar_give_zero():
    assert list(transferability(np.ones((1, 8)), num_layers=2)) == [0.0]
    c = np.ones((4, 8)) + 1e-3 * np.arange(32).reshape(4, 8)
    assert list(transferability(c, num_layers=1)) == [0.0] * 4


def test_one_centroid_similar_to_all_others():
    # Language halves: a, a', b with a ~ a' (cos > 0.9), b orthogonal to both.
    c = np.zeros((3, 4))
    c[0, 2:] = [1.0, 0.0]
    c[1, 2:] = [1.0, 0.1]
    c[2, 2:] = [0.0, 1.0]
    s = transferability(c, num_layers=1)
    cos12 = 0.1 / np.sqrt(1.01)
    assert s == pytest.approx([0.0, cos12, cos12 / 2])


def test_language_halves_layout():
    # layer-major [v0, t0, v1, t1] with H = 2
    v = np.arange(8.0)[None]
    assert list(language_halves(v, 2)[0]) == [2.0, 3.0, 6.0, 7.0]
    with pytest.raises(ValueError, match="not 2 \\* num_layers"):
        language_halves(np.zeros((1, 10)), 3)


def test_centroid_itself_never_counts_even_without_a_mask():
    # With similarity_mask >= 1 nothing is masked, and i itself must still be left out.
    c = np.random.default_rng(3).standard_normal((5, 8))
    for mask in (1.0, 2.0):
        expected = naive.transferability(c, 2, mask)
        assert np.allclose(transferability(c, num_layers=2, similarity_mask=mask), expected, rtol=1e-12)


def test_a_pair_exactly_at_the_mask_is_kept():
    """Only pairs *above* the mask are ignored: (1,0,0,0) and (1,1,1,1)/2 have cosine 0.5
    exactly in floating point, and with the mask at 0.5 that pair still counts."""
    halves = np.array([[1.0, 0, 0, 0], [0.5, 0.5, 0.5, 0.5], [0, 0, 0, 1.0]])
    centroids = np.concatenate([np.ones_like(halves), halves], axis=1)  # one layer: [v_0, t_0]
    got = transferability(centroids, num_layers=1, similarity_mask=0.5)
    assert list(got) == [0.25, 0.5, 0.25]
    assert np.array_equal(got, naive.transferability(centroids, 1, 0.5))
