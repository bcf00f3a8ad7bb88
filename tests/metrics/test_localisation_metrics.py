"""Batched localisation metrics: hand-computed values, ties, padding, jit, references, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from saljax import metrics

# One 2x3 map and its mask: |M| = 2, the two 2s tie (one inside, one outside).
S = np.array([[[3.0, -1.0, 2.0], [0.0, 1.0, 2.0]]])
M = np.array([[[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]]])

PER_IMAGE = {
    "pointing_game": metrics.pointing_game,
    "attribution_localisation": metrics.attribution_localisation,
    "relevance_rank_accuracy": metrics.relevance_rank_accuracy,
    "relevance_mass_accuracy": metrics.relevance_mass_accuracy,
    "pixel_auc": metrics.pixel_auc,
    "energy_pointing_game": metrics.energy_pointing_game,
    "saliency_iou": metrics.saliency_iou,
    "top_k_intersection": lambda s, m, **kw: metrics.top_k_intersection(s, m, 2, **kw),
}


def test_hand_computed_values(x64):
    # s+ = 3, 0, 2, 0, 1, 2 (sum 8, 5 inside); s sums to 7.
    assert float(metrics.pointing_game(S, M)[0]) == 1.0
    assert float(metrics.attribution_localisation(S, M)[0]) == 5 / 8
    assert float(metrics.relevance_mass_accuracy(S, M)[0]) == 5 / 7
    # Energy-based pointing game: min-max of s+ is s+ / 3 here, so the same share.
    assert float(metrics.energy_pointing_game(S, M)[0]) == 5 / 8
    # Top-2: 3 (inside) and one of the tied 2s (inside with probability 1/2): 1.5 hits.
    assert float(metrics.top_k_intersection(S, M, 1)[0]) == 1.0
    assert float(metrics.top_k_intersection(S, M, 2)[0]) == 0.75
    assert float(metrics.top_k_intersection(S, M, 3)[0]) == 2 / 3  # 3, 2 and 2: both tied places taken
    assert float(metrics.top_k_intersection(S, M, 6)[0]) == 2 / 6
    assert float(metrics.relevance_rank_accuracy(S, M)[0]) == 0.75
    assert float(metrics.saliency_iou(S, M)[0]) == 1.5 / (4 - 1.5)
    # AUC: 3 beats the 4 outside values, 2 beats -1, 0, 1 and ties 2: (4 + 3.5) / 8.
    assert float(metrics.pixel_auc(S, M)[0]) == 7.5 / 8


def test_energy_pointing_game_min_max_normalises_first(x64):
    s = np.array([[[2.0, 3.0], [4.0, 5.0]]])
    corner = np.array([[[0.0, 0.0], [0.0, 1.0]]])
    # e = (s - 2) / 3 = 0, 1/3, 2/3, 1 (sum 2); the corner holds 1 of it.
    assert float(metrics.energy_pointing_game(s, corner)[0]) == 0.5
    assert float(metrics.attribution_localisation(s, corner)[0]) == 5 / 14
    assert float(metrics.energy_pointing_game(s, 1.0 - corner)[0]) == 0.5
    assert np.isnan(metrics.energy_pointing_game(np.ones_like(s), corner)[0])  # constant: no map


def test_signed_maps_and_no_positive_attribution(x64):
    s = -np.ones((1, 2, 3))
    assert float(metrics.attribution_localisation(s, M)[0]) == 0.0
    assert float(metrics.relevance_mass_accuracy(s, M)[0]) == 2 / 6  # -2 / -6, values as given
    assert np.isnan(metrics.relevance_mass_accuracy(np.array([[[1.0, -1.0, 0], [0, 0, 0]]]), M)[0])  # sums to 0


def test_constant_maps_score_the_area_fraction(x64):
    h = np.zeros((1, 4, 4))
    h[0, :2, :1] = 1.0  # 2 of 16 pixels
    c = np.ones_like(h)
    a = 2 / 16
    for name in ("pointing_game", "relevance_rank_accuracy", "top_k_intersection"):
        assert float(PER_IMAGE[name](c, h)[0]) == pytest.approx(a, abs=1e-15), name
    assert float(metrics.pixel_auc(c, h)[0]) == 0.5
    inter = 2 * a
    assert float(metrics.saliency_iou(c, h)[0]) == pytest.approx(inter / (4 - inter), abs=1e-15)


def test_perfect_and_reversed_maps():
    h = np.zeros((2, 5, 5), bool)
    h[0, 1:3, 1:4] = True
    h[1, 4, :] = True
    s = np.where(h, 2.0, 0.5) + 0.01 * np.arange(25).reshape(5, 5)
    for name, fn in PER_IMAGE.items():
        if name in ("relevance_mass_accuracy", "attribution_localisation", "energy_pointing_game"):
            continue
        np.testing.assert_allclose(fn(s, h), 1.0, err_msg=name)
    np.testing.assert_allclose(metrics.pixel_auc(-s, h), 0.0)
    np.testing.assert_allclose(metrics.saliency_iou(-s, h), 0.0)
    np.testing.assert_allclose(metrics.energy_pointing_game(np.where(h, 1.0, 0.0), h), 1.0)


@pytest.mark.parametrize("name", sorted(PER_IMAGE))
def test_empty_masks_padding_and_boolean_or_soft_masks(name):
    fn = PER_IMAGE[name]
    rng = np.random.default_rng(0)
    s = rng.normal(size=(4, 3, 4)).astype(np.float32)
    soft = rng.random((4, 3, 4)).astype(np.float32)
    soft[0, 0, :2], soft[0, 1, 0] = 0.9, 0.2  # image 0 keeps a mix of inside and outside pixels
    soft[2] = 0.1  # image 2: empty mask
    soft[0, 2, :] = 0.3
    out = np.asarray(fn(s, soft))
    assert out.shape == (4,) and np.isnan(out[2]) and np.isfinite(out[[0, 1, 3]]).all()
    # A boolean mask equals the soft mask binarised at the threshold; the threshold is a parameter.
    np.testing.assert_array_equal(out, fn(s, soft >= 0.5))
    np.testing.assert_array_equal(fn(s, soft, threshold=0.25), fn(s, soft >= 0.25))
    # Padding samples are NaN; the others are unchanged.
    padded = np.asarray(fn(s, soft, valid=np.array([1, 0, 1, 1])))
    assert np.isnan(padded[1])
    np.testing.assert_array_equal(padded[[0, 3]], out[[0, 3]])


@pytest.mark.parametrize("name", sorted(PER_IMAGE))
def test_jit_and_batching_agree_with_per_image_calls(name):
    fn = PER_IMAGE[name]
    rng = np.random.default_rng(1)
    s = rng.integers(-2, 4, size=(3, 4, 5)).astype(np.float32)  # many ties
    h = rng.random((3, 4, 5)) > 0.6
    h[:, 0, 0], h[:, 0, 1] = True, False
    batched = np.asarray(fn(s, h))
    single = np.array([float(fn(s[i : i + 1], h[i : i + 1])[0]) for i in range(3)])
    np.testing.assert_allclose(batched, single, rtol=1e-6)
    valid = jnp.array([True, False, True])
    jitted = jax.jit(lambda a, b, v: fn(a, b, valid=v))(jnp.asarray(s), jnp.asarray(h), valid)
    np.testing.assert_allclose(jitted, np.where([True, False, True], batched, np.nan), rtol=1e-6)


def test_pixel_auc_matches_sklearn_exactly(x64):
    rng = np.random.default_rng(2)
    s = rng.integers(0, 6, size=(5, 7, 6)).astype(np.float64)  # heavy ties
    s[3] = rng.normal(size=(7, 6))  # and a continuous map
    h = rng.random((5, 7, 6)) > 0.55
    got = np.asarray(metrics.pixel_auc(s, h))
    want = [roc_auc_score(h[i].ravel(), s[i].ravel()) for i in range(5)]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-15)
    # Single precision stays within rounding of the exact value.
    np.testing.assert_allclose(metrics.pixel_auc(s.astype(np.float32), h), want, rtol=1e-6)
    assert np.isnan(metrics.pixel_auc(s[:1], np.ones_like(h[:1]))[0])  # no outside pixel


def _quantus_style(s, h, k):
    """Top-k hits with a stable descending sort (no ties in the maps used)."""
    order = np.argsort(-s.reshape(len(s), -1), axis=1, kind="stable")
    return np.take_along_axis(h.reshape(len(h), -1), order[:, :k], axis=1).sum(axis=1)


def test_top_k_metrics_match_a_sorting_reference_without_ties(x64):
    rng = np.random.default_rng(3)
    s = rng.normal(size=(4, 6, 6))
    h = rng.random((4, 6, 6)) > 0.7
    size = h.reshape(4, -1).sum(axis=1)
    np.testing.assert_allclose(metrics.top_k_intersection(s, h, 5), _quantus_style(s, h, 5) / 5)
    hits = np.array([_quantus_style(s[i : i + 1], h[i : i + 1], size[i])[0] for i in range(4)])
    np.testing.assert_allclose(metrics.relevance_rank_accuracy(s, h), hits / size)
    np.testing.assert_allclose(metrics.saliency_iou(s, h), hits / (2 * size - hits))
    arg = s.reshape(4, -1).argmax(axis=1)
    np.testing.assert_allclose(metrics.pointing_game(s, h), h.reshape(4, -1)[np.arange(4), arg])


def test_finite_sum_count_skips_nan_and_padding():
    total, count = metrics.finite_sum_count(jnp.array([1.0, jnp.nan, 3.0, 5.0]), jnp.array([1, 1, 1, 0]))
    assert float(total) == 4.0 and int(count) == 2
    with pytest.raises(ValueError, match=r"valid must have the shape of values \(4,\); got \(3,\)"):
        metrics.finite_sum_count(jnp.zeros(4), jnp.ones(3))


@pytest.mark.parametrize("name", sorted(PER_IMAGE))
def test_bad_shapes_raise_clear_errors(name):
    fn = PER_IMAGE[name]
    s = np.zeros((2, 3, 4))
    with pytest.raises(ValueError, match=r"mask must have the shape of saliency \(2, 3, 4\); got \(2, 4, 3\)"):
        fn(s, np.zeros((2, 4, 3)))
    with pytest.raises(ValueError, match=r"saliency must have shape \(B, H, W\); got \(3, 4\)"):
        fn(s[0], s[0])
    with pytest.raises(ValueError, match=r"valid must have shape \(B,\) = \(2,\); got \(3,\)"):
        fn(s, s, valid=np.ones(3))


def test_top_k_intersection_checks_k():
    s = np.zeros((1, 2, 2))
    for bad in (0, 5, 1.5, True):
        with pytest.raises(ValueError, match=r"k must be an int in \[1, H \* W = 4\]"):
            metrics.top_k_intersection(s, s, bad)
