"""The XIL wrong-reason score: hand-computed values, two passes over batches, padding, jit, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saljax import metrics

# Image 1: s+ = 0, 0, 1, 3 -> m = 0, 0, 1/3, 1 (mean 1/3); image 2: 2, 2, 2, 4 -> 0, 0, 0, 1 (mean 1/4).
MAPS = np.array([[[-1.0, 0.0], [1.0, 3.0]], [[2.0, 2.0], [2.0, 4.0]]])
REGION = np.array([[[0.0, 0.0], [1.0, 0.0]], [[1.0, 1.0], [0.0, 1.0]]])
T = (1 / 3 + 1 / 4) / 2  # 7/24: m > t marks pixels (1, 0), (1, 1) of image 1 and (1, 1) of image 2
WR = np.array([1.0, 1 / 3])


def test_normalize_maps(x64):
    np.testing.assert_allclose(metrics.normalize_maps(MAPS), [[[0, 0], [1 / 3, 1]], [[0, 0], [0, 1]]])
    np.testing.assert_array_equal(metrics.normalize_maps(-np.ones((1, 2, 2))), np.zeros((1, 2, 2)))


def test_hand_computed_wrong_reason(x64):
    stats = metrics.wrong_reason_threshold_stats(MAPS)
    assert float(stats.mean_sum) == pytest.approx(7 / 12) and int(stats.num_images) == 2
    t = metrics.wrong_reason_threshold(stats)
    assert float(t) == pytest.approx(T)
    np.testing.assert_allclose(metrics.wrong_reason_per_image(MAPS, REGION, t), WR)
    assert float(metrics.wrong_reason_score(MAPS, REGION)) == pytest.approx(100 * WR.mean())
    # A is weighted, not binarised; a boolean A works alike.
    soft = REGION * np.array([1.0, 0.5])[:, None, None]
    soft[1, 1, 1] = 1.0  # image 2: weights 0.5, 0.5, 1 -> marked 1 of 2
    np.testing.assert_allclose(metrics.wrong_reason_per_image(MAPS, soft, t), [1.0, 0.5])
    np.testing.assert_allclose(metrics.wrong_reason_per_image(MAPS, REGION > 0, t), WR)


def test_two_passes_over_padded_batches_equal_one_call_over_the_set():
    rng = np.random.default_rng(0)
    maps = rng.normal(size=(7, 5, 5)).astype(np.float32)
    region = np.zeros((7, 5, 5), np.float32)
    region[:, :2, :2] = 1.0
    region[3] = 0.0  # an image without A is left out of the mean, but counts for t
    whole = float(metrics.wrong_reason_score(maps, region))

    batches = []
    for start in range(0, 7, 3):  # batches of 3; the last one padded with garbage
        m, r = maps[start : start + 3], region[start : start + 3]
        pad = 3 - len(m)
        valid = np.array([1] * len(m) + [0] * pad)
        garbage = 9 * np.ones((pad, 5, 5), np.float32)
        batches.append((np.concatenate([m, garbage]), np.concatenate([r, np.ones((pad, 5, 5))]), valid))
    stats_fn = jax.jit(lambda m, v: metrics.wrong_reason_threshold_stats(m, valid=v))
    stats = None
    for m, _, v in batches:
        s = stats_fn(m, v)
        stats = s if stats is None else jax.tree.map(jnp.add, stats, s)
    t = metrics.wrong_reason_threshold(stats)
    per_image = jax.jit(lambda m, r, t, v: metrics.finite_sum_count(metrics.wrong_reason_per_image(m, r, t, valid=v)))
    total, count = 0.0, 0
    for m, r, v in batches:
        s, c = per_image(m, r, t, v)
        total, count = total + float(s), count + int(c)
    assert count == 6
    assert 100 * total / count == pytest.approx(whole, rel=1e-6)
    # The padded whole set with `valid` gives the same number.
    all_maps = np.concatenate([b[0] for b in batches])
    all_regions = np.concatenate([b[1] for b in batches])
    all_valid = np.concatenate([b[2] for b in batches])
    assert float(metrics.wrong_reason_score(all_maps, all_regions, valid=all_valid)) == pytest.approx(whole, rel=1e-6)
    assert float(jax.jit(metrics.wrong_reason_score)(maps, region)) == pytest.approx(whole, rel=1e-6)


def test_wrong_reason_bad_input():
    with pytest.raises(ValueError, match=r"region must have the shape of maps \(2, 2, 2\); got \(2, 2\)"):
        metrics.wrong_reason_score(MAPS, REGION[0])
    with pytest.raises(ValueError, match=r"maps must have shape \(B, H, W\)"):
        metrics.wrong_reason_threshold_stats(MAPS[0])
    with pytest.raises(ValueError, match=r"threshold must be a scalar"):
        metrics.wrong_reason_per_image(MAPS, REGION, np.ones(2))
    with pytest.raises(ValueError, match=r"valid must have shape \(B,\) = \(2,\); got \(1,\)"):
        metrics.wrong_reason_per_image(MAPS, REGION, 0.5, valid=np.ones(1))
