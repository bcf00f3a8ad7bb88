"""Tests of the post-hoc explanation tool (`saljax.explain`) and its metrics (`saljax.metrics`)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from saljax import explain, metrics, models, saliency

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SIZE = 16
# Few IG steps / SmoothGrad samples: the tests check wiring, not quadrature accuracy.
FAST = explain.ExplainConfig(ig_steps=4, smoothgrad_samples=3, batch_size=8)


def tiny_model(num_classes: int = 2, **kwargs) -> nnx.Module:
    """SimpleCNN with two stride-2 convs: 16x16 images -> 4x4 feature maps, so CAMs have structure."""
    model = models.create(
        "simple_cnn", num_classes=num_classes, in_channels=1, channels=(4, 4), rngs=nnx.Rngs(0), **kwargs
    )
    # A non-zero bias, so the divergence identity has its bias term.
    model.classifier.bias[...] = jnp.linspace(0.3, -0.2, num_classes)
    return model


def make_batches(n: int = 12, batch: int = 5, has_map=None, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Images whose maps are a square per image; groups 0/1/2; batches of uneven size."""
    rng = np.random.default_rng(seed)
    smap = np.zeros((n, SIZE, SIZE), np.float32)
    for i in range(n):
        y, x = rng.integers(0, SIZE - 6, size=2)
        smap[i, y : y + 6, x : x + 6] = 1.0
    data = {
        "image": rng.normal(size=(n, SIZE, SIZE, 1)).astype(np.float32),
        "label": (np.arange(n) % 2).astype(np.int32),
        "saliency_map": smap,
        "has_map": np.ones(n, bool) if has_map is None else np.asarray(has_map, bool),
        "group": (np.arange(n) % 3).astype(np.int32),
    }
    return [{k: v[i : i + batch] for k, v in data.items()} for i in range(0, n, batch)]


@pytest.fixture(scope="session")
def model() -> nnx.Module:
    return tiny_model()


@pytest.fixture(scope="session")
def report(model, tmp_path_factory):
    has_map = np.ones(12, bool)
    has_map[[3, 7]] = False
    out_dir = tmp_path_factory.mktemp("explain")
    summary = explain.run(
        model,
        make_batches(has_map=has_map),
        out_dir=out_dir,
        num_images_to_plot=2,
        split_name="test",
        config=FAST,
        progress=False,
    )
    return summary, out_dir


# --- metrics on hand-made maps -------------------------------------------------------------------


def square_map() -> np.ndarray:
    """(1, 8, 8) map: a 4x4 square in the top-left corner (16 of 64 pixels)."""
    h = np.zeros((1, 8, 8))
    h[0, :4, :4] = 1.0
    return h


def test_pointing_game_inside_outside_and_ties():
    h = square_map()
    inside = np.zeros_like(h)
    inside[0, 1, 2] = 5.0
    outside = np.zeros_like(h)
    outside[0, 6, 6] = 5.0
    assert metrics.pointing_game(inside, h)[0] == 1.0
    assert metrics.pointing_game(outside, h)[0] == 0.0
    # A constant map hits with probability = the map's area fraction.
    assert metrics.pointing_game(np.ones_like(h), h)[0] == pytest.approx(16 / 64)
    assert np.isnan(metrics.pointing_game(inside, np.zeros_like(h))[0])


def test_energy_inside_is_exact_and_uses_the_positive_part():
    h = square_map()
    s = np.zeros_like(h)
    s[0, 0, 0], s[0, 3, 3], s[0, 7, 7] = 2.0, 1.0, 1.0
    assert metrics.energy_inside(s, h)[0] == pytest.approx(0.75)
    s[0, 5, 5] = -10.0  # negative values carry no energy
    assert metrics.energy_inside(s, h)[0] == pytest.approx(0.75)
    # Soft maps weigh by their value, as fraction_inside.
    assert metrics.energy_inside(s, 0.5 * h)[0] == pytest.approx(0.375)


def test_pixel_auc_known_values():
    h = square_map()
    assert metrics.pixel_auc(h, h)[0] == pytest.approx(1.0)
    assert metrics.pixel_auc(np.ones_like(h), h)[0] == pytest.approx(0.5)
    assert metrics.pixel_auc(1.0 - h, h)[0] == pytest.approx(0.0)
    assert np.isnan(metrics.pixel_auc(h, np.zeros_like(h))[0])
    assert np.isnan(metrics.pixel_auc(h, np.ones_like(h))[0])
    # Ties and random values: the same statistic as metrics.roc_auc over the pixels.
    rng = np.random.default_rng(1)
    s = rng.integers(0, 5, size=(3, 8, 8)).astype(float)
    m = rng.random((3, 8, 8))
    got = metrics.pixel_auc(s, m)
    want = [metrics.roc_auc(s[i].ravel(), (m[i] >= 0.5).ravel().astype(int)) for i in range(3)]
    np.testing.assert_allclose(got, want)


def test_top_q_region_iou_and_precision_on_designed_masks():
    s = np.ones((1, 10, 10))
    s[0, 0, :] = 2.0  # the top 10% (10 pixels) is row 0
    h = np.zeros((1, 10, 10))
    h[0, :2, :] = 1.0  # rows 0 and 1
    top = metrics.top_q_mask(s, 0.1)
    assert top.sum() == 10 and top[0, 0].all()
    assert metrics.top_q_iou(s, h, q=0.1)[0] == pytest.approx(0.5)
    assert metrics.top_q_precision(s, h, q=0.1)[0] == pytest.approx(1.0)
    # Half of the region inside a map of 5 + 10 pixels: IoU 5 / (10 + 15 - 5).
    h2 = np.zeros((1, 10, 10))
    h2[0, 0, :5] = 1.0
    h2[0, 5, :] = 1.0
    assert metrics.top_q_iou(s, h2, q=0.1)[0] == pytest.approx(5 / 20)
    assert metrics.top_q_precision(s, h2, q=0.1)[0] == pytest.approx(0.5)
    # Non-positive pixels never enter the region.
    signed = -np.ones((1, 10, 10))
    signed[0, 9, 9] = 1.0
    assert metrics.top_q_mask(signed, 0.5).sum() == 1
    assert np.isnan(metrics.top_q_precision(-np.ones((1, 10, 10)), h)[0])
    with pytest.raises(ValueError, match="q must be a fraction"):
        metrics.top_q_mask(s, 0.0)


def test_iou_exact_and_empty():
    a = np.zeros((2, 4, 4), bool)
    b = np.zeros((2, 4, 4), bool)
    a[0, :2], b[0, 1:3] = True, True  # 4 shared of 12
    got = metrics.iou(a, b)
    assert got[0] == pytest.approx(4 / 12)
    assert np.isnan(got[1])


def test_connected_components_on_a_designed_map():
    mask = np.zeros((6, 6), bool)
    mask[0, 0] = mask[1, 1] = True  # touch at a corner only
    mask[3:5, 3:6] = True
    labels8, n8 = metrics.connected_components(mask, connectivity=8)
    labels4, n4 = metrics.connected_components(mask, connectivity=4)
    assert (n8, n4) == (2, 3)
    assert labels8[0, 0] == labels8[1, 1] != labels8[3, 3]
    assert labels4[0, 0] != labels4[1, 1]
    assert (labels8 > 0).sum() == mask.sum() and (labels8[~mask] == 0).all()


def test_top_regions_ranked_by_energy_with_overlap():
    d = np.zeros((8, 8))
    d[0, 0:2] = 3.0  # small, strong: 6 units, outside the map
    d[5:7, 5:7] = 2.0  # larger: 8 units, inside the map
    d[7, 0] = -4.0  # negative divergence is not a region
    h = np.zeros((8, 8))
    h[4:, 4:] = 1.0
    labels, regions = metrics.top_regions(d, h, q=6 / 64)
    assert [r.rank for r in regions] == [1, 2]
    first, second = regions
    assert (first.area, first.energy, first.overlap) == (4, 8.0, 1.0)
    assert (second.area, second.energy, second.overlap) == (2, 6.0, 0.0)
    assert first.energy_fraction == pytest.approx(8 / 14)
    assert first.bbox == (5, 5, 7, 7) and first.centroid == pytest.approx((5.5, 5.5))
    assert (labels == 1).sum() == 4 and (labels[0, 0:2] == 2).all()
    _, only_one = metrics.top_regions(d, None, q=6 / 64, max_regions=1)
    assert len(only_one) == 1 and np.isnan(only_one[0].overlap)


def test_aggregate_skips_nan():
    assert metrics.aggregate([1.0, 3.0, np.nan]) == {"mean": 2.0, "std": 1.0, "count": 2}
    empty = metrics.aggregate([np.nan])
    assert empty["count"] == 0 and np.isnan(empty["mean"])


# --- maps ----------------------------------------------------------------------------------------


def test_divergence_is_cam_difference_and_decomposes_the_margin(model):
    batch = make_batches(n=6, batch=6)[0]
    x, y = batch["image"], batch["label"]
    out = explain.explain_batch(model, x, y, methods=explain.CAM_METHODS, config=FAST)
    low, maps = out["lowres"], out["maps"]
    assert low["divergence"].shape == (6, 4, 4) and maps["divergence"].shape == (6, SIZE, SIZE)
    np.testing.assert_allclose(low["divergence"], low["cam_true"] - low["cam_false"], atol=1e-6)
    np.testing.assert_allclose(maps["divergence"], maps["cam_true"] - maps["cam_false"], atol=1e-5)
    eval_model = nnx.view(model, use_running_average=True)
    want_true = saliency.cam(eval_model.features, eval_model.head, jnp.asarray(x), jnp.asarray(y))
    np.testing.assert_allclose(low["cam_true"], want_true, atol=1e-5)
    # mean_ij D = (z_t - z_f) - (b_t - b_f); bilinear upsampling by 4 keeps the mean.
    logits = out["logits"]
    bias = np.asarray(model.classifier.bias[...])
    rows = np.arange(6)
    margin = logits[rows, y] - logits[rows, 1 - y]
    expected = margin - (bias[y] - bias[1 - y])
    np.testing.assert_allclose(low["divergence"].mean(axis=(1, 2)), expected, atol=1e-5)
    np.testing.assert_allclose(maps["divergence"].mean(axis=(1, 2)), expected, atol=1e-5)
    assert np.abs(expected).max() > 1e-3  # the identity is not trivially 0 = 0


@pytest.mark.slow  # ~5 s on 2 cores
def test_gradient_maps_match_the_saliency_module(model):
    batch = make_batches(n=4, batch=4)[0]
    x, y = jnp.asarray(batch["image"]), jnp.asarray(batch["label"])
    key = jax.random.key(3)
    out = explain.explain_batch(model, x, y, config=FAST, key=key)
    net = nnx.view(model, use_running_average=True)
    g, ig, sg, gc = nnx.jit(lambda net: (  # the references in one program: eagerly, every op compiles alone
        saliency.vanilla_gradient(net, x, y),
        saliency.integrated_gradients(net, x, y, n_steps=FAST.ig_steps),
        saliency.smoothgrad(net, x, y, key=key, nt_samples=FAST.smoothgrad_samples, stdevs=FAST.smoothgrad_stdevs),
        saliency.grad_cam(net.features, net.head, x, y)))(net)
    np.testing.assert_allclose(out["maps"]["gradient"], jnp.sum(jnp.abs(g), -1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["maps"]["gradient_x_input"], jnp.sum(jnp.abs(x * g), -1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["maps"]["integrated_gradients"], jnp.sum(jnp.abs(ig), -1), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(out["maps"]["smoothgrad"], jnp.sum(jnp.abs(sg), -1), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(out["lowres"]["grad_cam"], gc, rtol=1e-5, atol=1e-6)
    for name, value in out["maps"].items():
        assert value.shape == (4, SIZE, SIZE), name
        if name not in explain.SIGNED_METHODS:
            assert (value >= 0).all(), name


@pytest.mark.slow  # ~4 s on 2 cores
def test_unrolled_and_scanned_steps_agree(model):
    batch = make_batches(n=4, batch=4)[0]
    methods = ("integrated_gradients", "smoothgrad")
    key = jax.random.key(5)
    unrolled = explain.explain_batch(model, batch["image"], batch["label"], methods=methods, config=FAST, key=key)
    # Past max_unroll the steps run in lax.scan (saliency module): the same numbers.
    scanned_config = dataclasses.replace(FAST, max_unroll=1)
    scanned = explain.explain_batch(
        model, batch["image"], batch["label"], methods=methods, config=scanned_config, key=key
    )
    for name in methods:
        np.testing.assert_allclose(unrolled["maps"][name], scanned["maps"][name], rtol=1e-4, atol=1e-6, err_msg=name)


@pytest.mark.slow  # ~7 s on 2 cores
def test_eval_mode_leaves_the_model_alone_and_samples_independent():
    model = tiny_model()
    before = jax.tree.map(np.array, nnx.state(model, nnx.BatchStat))
    batch = make_batches(n=4, batch=4)[0]
    all_four = explain.explain_batch(model, batch["image"], batch["label"], config=FAST)
    alone = explain.explain_batch(model, batch["image"][:1], batch["label"][:1], config=FAST)
    for name in ("gradient", "grad_cam", "divergence"):
        np.testing.assert_allclose(all_four["maps"][name][:1], alone["maps"][name], rtol=1e-5, atol=1e-6)
    after = nnx.state(model, nnx.BatchStat)
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, after))


@pytest.mark.slow  # ~7 s on 2 cores
def test_uneven_batches_are_regrouped_in_order(model):
    config = explain.ExplainConfig(methods=("gradient", "divergence"), batch_size=4)
    uneven = explain.explain(model, make_batches(n=11, batch=3), config=config, num_images=0, progress=False)
    whole = explain.explain(model, make_batches(n=11, batch=11), config=config, num_images=0, progress=False)
    np.testing.assert_array_equal(uneven.per_image["index"], np.arange(11))
    for key in ("label", "margin", "gradient/auc", "divergence/energy_inside"):
        np.testing.assert_allclose(uneven.per_image[key], whole.per_image[key], rtol=1e-5, err_msg=key)


# --- run and the report ----------------------------------------------------------------------------


def markdown_tables(text: str) -> list[list[list[str]]]:
    """Parses the pipe tables of a Markdown text: a list of tables, each a list of rows of cells."""
    tables, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            current.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif current:
            tables.append(current)
            current = []
    return tables


# The tests that read the `report` fixture share a worker: it runs once, not once per worker. Slow: the
# fixture runs `explain.run` end to end (~17 s on 2 cores).
@pytest.mark.xdist_group("explain_report")
@pytest.mark.slow
def test_run_writes_the_report(report):
    summary, out_dir = report
    files = summary["files"]
    for key in ("report", "summary", "metrics", "per_image"):
        assert os.path.isfile(files[key]) and os.path.getsize(files[key]) > 0, key
    assert files["figures"] and all(f.endswith(".png") and os.path.isfile(f) for f in files["figures"])
    with open(files["summary"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    text = open(files["report"], encoding="utf-8").read()
    tables = markdown_tables(text)
    assert len(tables) >= 5
    for table in tables:
        assert all(re.fullmatch(r"-+", c) for c in table[1]), table[:2]  # header separator
        assert len({len(row) for row in table}) == 1, table  # one column count per table
    headers = [t[0] for t in tables]
    assert ["method", "energy inside", "ROC AUC", "pointing game", "IoU top-q", "precision top-q",
            "attribution localisation", "top-k intersection", "relevance rank accuracy", "relevance mass accuracy",
            "energy pointing game", "saliency IoU", "WR (%)"] in headers
    agreement = next(t for t in tables if t[0][0] == "method" and "ROC AUC" in t[0])
    assert [row[0] for row in agreement[2:]] == list(explain.resolve_methods(tiny_model()))
    links = re.findall(r"\]\(([^)]+)\)", text)
    assert "summary.png" in links and any(link.startswith("figures/") for link in links)
    for link in links:
        assert not os.path.isabs(link) and os.path.isfile(os.path.join(out_dir, link)), link
    assert "Where decisions divide most" in text and "Where decisions divide least" in text
    data = json.load(open(files["metrics"], encoding="utf-8"))
    assert data["num_images"] == 12 and data["num_with_map"] == 10
    rows = open(files["per_image"], encoding="utf-8").read().strip().splitlines()
    assert len(rows) == 13 and rows[0].startswith("index,")


@pytest.mark.xdist_group("explain_report")
@pytest.mark.slow
def test_run_aggregates_and_ranking(report):
    summary, _ = report
    assert summary["num_images"] == 12 and summary["num_with_map"] == 10
    split = summary["aggregate"]["split"]
    # Samples without a map are left out of the map metrics, not of the model rows.
    assert split["gradient"]["energy_inside"]["count"] == 10
    assert split["model"]["correct"]["count"] == 12
    per_image = summary["per_image"]
    assert np.isnan(per_image["gradient/auc"][[3, 7]]).all()
    np.testing.assert_allclose(
        split["divergence"]["energy_inside"]["mean"], np.nanmean(per_image["divergence/energy_inside"])
    )
    groups = summary["aggregate"]["groups"]
    assert sorted(groups) == [0, 1, 2]
    assert sum(g["gradient"]["auc"]["count"] for g in groups.values()) == 10
    ranking = summary["ranking"]
    assert ranking["key"] == "divergence/energy_inside"
    score = per_image["divergence/energy_inside"]
    assert len(ranking["most"]) == len(ranking["least"]) == 2
    assert score[ranking["most"][0]] == np.nanmax(score)
    assert score[ranking["least"][0]] == np.nanmin(score)
    assert not set(ranking["most"] + ranking["least"]) & {3, 7}


def test_run_without_maps_when_allowed(model, tmp_path):
    batches = [{k: v for k, v in b.items() if k not in ("saliency_map", "has_map")} for b in make_batches(n=6)]
    summary = explain.run(
        model,
        batches,
        out_dir=tmp_path,
        methods="gradient,divergence",
        map_metrics=False,
        num_images_to_plot=1,
        progress=False,
        ig_steps=2,
    )
    assert summary["ranking"]["key"] == "margin"
    assert summary["aggregate"]["split"]["divergence"]["num_regions"]["count"] == 6
    text = open(summary["files"]["report"], encoding="utf-8").read()
    assert "| ROC AUC |" not in text and "switched off" in text and os.path.isfile(tmp_path / "summary.png")


# --- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["divergence", "cam_true", "cam_false"])
def test_non_binary_model_rejects_true_false_cams(method):
    model = tiny_model(num_classes=3)
    with pytest.raises(ValueError, match=r"needs a binary model \(num_classes == 2\); this model has num_classes=3"):
        explain.resolve_methods(model, [method])
    with pytest.raises(ValueError, match=f"method '{method}'"):
        explain.run(model, make_batches(), out_dir="unused", methods=[method], progress=False)
    # By default such a model simply gets the methods it supports.
    assert not set(explain.resolve_methods(model)) & set(explain.BINARY_METHODS)


def test_cam_method_needs_a_gap_head():
    model = tiny_model(head_type="mlp", input_size=SIZE)
    with pytest.raises(ValueError, match=r"method 'cam_true' .* \(head_type 'gap'\); this model has head_type 'mlp'"):
        explain.resolve_methods(model, ["gradient", "cam_true"])
    assert not set(explain.resolve_methods(model)) & set(explain.CAM_METHODS)


def test_missing_maps_raise_unless_allowed(model):
    no_key = [{k: v for k, v in b.items() if k != "saliency_map"} for b in make_batches()]
    with pytest.raises(ValueError, match=r"batch 0 has no 'saliency_map' entry.*map_metrics=False"):
        explain.explain(model, no_key, config=FAST, progress=False)
    no_map = make_batches(has_map=np.zeros(12, bool))
    with pytest.raises(ValueError, match=r"no sample of split 'val' has a human saliency map.*--no-map-metrics"):
        explain.explain(model, no_map, config=FAST, split_name="val", progress=False)


def test_other_bad_inputs(model):
    with pytest.raises(ValueError, match=r"unknown explanation method\(s\) \['gradcam'\]"):
        explain.resolve_methods(model, "gradient,gradcam")
    rgb = [{**b, "image": np.repeat(b["image"], 3, axis=-1)} for b in make_batches()]
    with pytest.raises(ValueError, match=r"in_channels=1; the batches have 3 channel"):
        explain.explain(model, rgb, config=FAST, progress=False)
    bad_label = [{**b, "label": b["label"] + 2} for b in make_batches()]
    with pytest.raises(ValueError, match=r"'label' must lie in \[0, num_classes=2\)"):
        explain.explain(model, bad_label, config=FAST, progress=False)
    small_map = [{**b, "saliency_map": b["saliency_map"][:, :8, :8]} for b in make_batches()]
    with pytest.raises(ValueError, match=r"'saliency_map' must have the image size"):
        explain.explain(model, small_map, config=FAST, progress=False)
    with pytest.raises(ValueError, match=r"ExplainConfig.top_q must be a fraction"):
        explain.ExplainConfig(top_q=1.5)
    with pytest.raises(ValueError, match=r"ExplainConfig.ig_steps must be a positive int"):
        explain.ExplainConfig(ig_steps=0)


# --- command line ----------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    return explain.add_arguments(argparse.ArgumentParser(prog="saljax explain"))


def test_add_arguments_declares_the_options():
    args = parser().parse_args(
        [
            "--checkpoint", "ckpt", "--dataset", "spurious_binary:test_open", "--data-dir", "data",
            "--out", "out", "--methods", "gradient,divergence", "--batch-size", "16", "--num-images", "3",
            "--ig-steps", "8", "--smoothgrad-samples", "5", "--top-q", "0.2", "--no-progress",
        ]
    )
    assert (args.checkpoint, args.dataset) == ("ckpt", "spurious_binary:test_open")
    assert (args.data_dir, args.out) == ("data", "out")
    assert (args.methods, args.batch_size, args.num_images) == ("gradient,divergence", 16, 3)
    assert (args.ig_steps, args.smoothgrad_samples, args.top_q, args.no_progress) == (8, 5, 0.2, True)
    assert not args.no_map_metrics


@pytest.mark.slow  # trains, saves and explains through the command line
def test_explain_command_on_a_trained_checkpoint(tmp_path, capsys):
    """`saljax train` then `saljax explain` on its work directory, through the real CLI."""
    from saljax import cli

    data_dir, workdir, out = tmp_path / "tfds", tmp_path / "run", tmp_path / "report"
    train_args = [
        "train", "--config", os.path.join(ROOT, "experiments", "configs", "spurious_binary.py:dd_paired"),
        "--workdir", str(workdir), f"dataset.data_dir={str(data_dir)!r}", "dataset.overrides.image_size=16",
        "dataset.overrides.num_train=8", "dataset.overrides.num_validation=4", "dataset.overrides.num_test_closed=6",
        "dataset.overrides.num_test_open=4", "model.name='simple_cnn'", "model.kwargs={'channels': (4, 4)}",
        "batch_size=4", "eval_batch_size=8", "num_devices=1", "num_steps=2", "eval_every=2", "progress=False"]
    assert cli.main(train_args) == 0
    capsys.readouterr()
    assert cli.main(["explain", "--checkpoint", str(workdir), "--out", str(out), "--methods",
                     "gradient,grad_cam,divergence", "--batch-size", "4", "--num-images", "1", "--no-progress"]) == 0
    assert "6 images of spurious_binary:test_closed" in capsys.readouterr().out
    assert (out / "report.md").is_file() and (out / "summary.png").is_file()
    # A split the dataset does not have is reported, not raised.
    assert cli.main(["explain", "--checkpoint", str(workdir), "--out", str(out), "--dataset", "spurious_binary:nope",
                     "--no-progress"]) == 2
    assert "has no split 'nope'" in capsys.readouterr().err


def test_wrong_reason_over_uneven_batches_equals_one_call_over_the_split(model):
    """WR's threshold is a statistic of the whole split: streaming over batches must not change it."""
    has_map = np.ones(12, bool)
    has_map[[3, 7]] = False
    batches = make_batches(has_map=has_map)
    config = dataclasses.replace(FAST, methods=("gradient", "rrr_gradient"))
    results = explain.explain(model, batches, config=config, num_images=0, progress=False)
    images = np.concatenate([b["image"] for b in batches])
    labels = np.concatenate([b["label"] for b in batches])
    smap = np.concatenate([b["saliency_map"] for b in batches])
    maps = explain.explain_batch(model, images, labels, config=config)["maps"]
    for method in ("gradient", "rrr_gradient"):
        # Images without a map have no region A but count towards the threshold, as in XIL.
        region = np.where(has_map[:, None, None], 1.0 - smap, 0.0)
        expected = float(metrics.wrong_reason_score(maps[method], region))
        got = results.aggregate["split"][method]["wrong_reason"]["mean"]
        np.testing.assert_allclose(got, expected, rtol=1e-5)
        assert np.isnan(results.per_image[f"{method}/wrong_reason"][[3, 7]]).all()


def test_rrr_gradient_is_the_summed_log_softmax_gradient_over_channels(model):
    images = np.asarray(jax.random.normal(jax.random.key(1), (3, SIZE, SIZE, 1)), np.float32)
    labels = np.array([0, 1, 0], np.int32)
    out = explain.explain_batch(model, images, labels, methods=("rrr_gradient",), config=FAST)
    view = nnx.view(model, use_running_average=True)
    grad = nnx.jit(lambda m, x: saliency.vanilla_gradient(m, x, saliency.sum_log_softmax_score).sum(-1))
    expected = grad(view, jnp.asarray(images))
    np.testing.assert_allclose(out["maps"]["rrr_gradient"], expected, rtol=1e-5, atol=1e-7)


@pytest.mark.xdist_group("explain_report")
@pytest.mark.slow
def test_new_localisation_columns_agree_with_the_metric_functions(report, model):
    summary, _ = report
    per_image = summary["per_image"]
    batches = make_batches()
    images = np.concatenate([b["image"] for b in batches])
    labels = np.concatenate([b["label"] for b in batches])
    smap = np.concatenate([b["saliency_map"] for b in batches])
    maps = explain.explain_batch(model, images, labels, methods=("gradient",), config=FAST)["maps"]["gradient"]
    has_map = per_image["has_map"]
    for name, fn in (("saliency_iou", metrics.saliency_iou), ("relevance_rank_accuracy", metrics.relevance_rank_accuracy),
                     ("attribution_localisation", metrics.attribution_localisation)):
        expected = np.where(has_map, np.asarray(fn(maps, smap), np.float64), np.nan)
        np.testing.assert_allclose(per_image[f"gradient/{name}"], expected, rtol=1e-5, equal_nan=True)


@pytest.mark.xdist_group("explain_report")
@pytest.mark.slow
def test_cd_share_is_cdeps_share_of_the_true_class_logit(report, model):
    """The CD share column: sigmoid(beta - gamma) of the true class, with beta due to (1 - H) * x."""
    summary, _ = report
    batches = make_batches()
    images = np.concatenate([b["image"] for b in batches])
    labels = np.concatenate([b["label"] for b in batches])
    smap = np.concatenate([b["saliency_map"] for b in batches])
    view = nnx.view(model, use_running_average=True)
    beta, gamma = models.decompose(view, jnp.asarray(images), jnp.asarray(1.0 - smap)[..., None])
    np.testing.assert_allclose(beta + gamma, view(jnp.asarray(images)), rtol=1e-4, atol=1e-5)
    expected = jax.nn.sigmoid(np.take_along_axis(np.asarray(beta - gamma), labels[:, None], 1)[:, 0])
    has_map = summary["per_image"]["has_map"]
    np.testing.assert_allclose(summary["per_image"]["cd_share"], np.where(has_map, expected, np.nan), rtol=1e-5,
                               equal_nan=True)
    assert "CD share of 1 - H" in open(summary["files"]["report"], encoding="utf-8").read()
