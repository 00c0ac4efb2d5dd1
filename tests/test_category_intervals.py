"""Per-category intervals (means, ranks, order, bifurcation share and layer) and component readings, each checked
against a closed form, SciPy, scikit-learn or an explicit index-resampling bootstrap written here."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import silhouette_samples

from tokentrail.analysis.category_intervals import bifurcation_intervals, category_intervals
from tokentrail.analysis.component_readings import component_readings
from tokentrail.analysis.separation import separation_by_layer


def _groups(rng, means, size, sd=1.0, layers=1):
    values = np.concatenate([rng.normal(m, sd, size=(size, layers)) for m in means])
    names = [f"c{i}" for i in range(len(means)) for _ in range(size)]
    return values, names


def test_category_mean_interval_is_the_normal_interval():
    rng = np.random.default_rng(0)
    values, names = _groups(rng, [0.0, 5.0], 400, sd=2.0)
    found = category_intervals(values, names, n_boot=4000, seed=3)
    for index in range(2):
        rows = values[index * 400:(index + 1) * 400, 0]
        half = stats.norm.ppf(0.975) * rows.std() / np.sqrt(rows.size)
        assert found.mean[index, 0] == pytest.approx(rows.mean())
        assert found.low[index, 0] == pytest.approx(rows.mean() - half, abs=0.02)
        assert found.high[index, 0] == pytest.approx(rows.mean() + half, abs=0.02)


def test_order_holds_matches_the_normal_approximation_of_a_difference_of_means():
    rng = np.random.default_rng(1)
    a, b = rng.normal(0.0, 1.0, 150), rng.normal(0.2, 1.0, 150)
    found = category_intervals(np.concatenate([a, b])[:, None], ["a"] * 150 + ["b"] * 150, n_boot=4000)
    low_one, high_one = (0, 1) if a.mean() < b.mean() else (1, 0)
    assert found.next_category[low_one, 0] == found.names[high_one]
    assert np.isnan(found.order_holds[high_one, 0]) and found.next_category[high_one, 0] == ""
    # P(resampled mean of the lower < that of the higher) ~ Phi(|difference| / standard error), plug-in sds.
    error = np.sqrt(a.var() / a.size + b.var() / b.size)
    expected = stats.norm.cdf(abs(b.mean() - a.mean()) / error)
    assert found.order_holds[low_one, 0] == pytest.approx(expected, abs=0.03)


def test_ranks_and_their_intervals():
    rng = np.random.default_rng(2)
    # c0 and c1 overlap (means 0 and 0.05, sd 1): either can rank first; c2 is far above both.
    values, names = _groups(rng, [0.0, 0.05, 10.0], 40, layers=2)
    found = category_intervals(values, names, n_boot=1000)
    by_hand = stats.rankdata(found.mean[:, 0])
    np.testing.assert_array_equal(found.rank[:, 0], by_hand)
    assert list(found.rank_low[:2, 0]) == [1, 1] and list(found.rank_high[:2, 0]) == [2, 2]
    assert found.rank_low[2, 0] == found.rank_high[2, 0] == 3
    assert found.order_holds[found.rank[:, 0].tolist().index(2), 0] == 1.0  # second is always below c2


def test_prompts_without_a_reading_and_tiny_categories_are_left_out():
    values = np.array([[0.0], [1.0], [np.nan], [2.0], [3.0], [4.0]])
    found = category_intervals(values, ["a", "a", "a", "b", "b", "lone"], n_boot=50)
    assert found.names == ["a", "b"] and list(found.counts) == [2, 2]
    assert found.mean[0, 0] == 0.5 and found.mean[1, 0] == 2.5
    assert category_intervals(np.array([[1.0], [2.0]]), ["a", "b"], n_boot=10) is None


def test_bifurcation_share_and_layer_intervals():
    rng = np.random.default_rng(4)
    n = 400
    left = rng.random(n) < 0.3
    layers = np.where(left, rng.normal(12, 3, n).round(), -1).astype(int)
    # "rare": 1 of 10 prompts bifurcates, so a resample holds it with probability 1 - 0.9^10.
    rare = np.array([7] + [-1] * 9)
    found = bifurcation_intervals(np.concatenate([layers, rare]), ["big"] * n + ["rare"] * 10, n_boot=4000)
    share = left.mean()
    half = stats.norm.ppf(0.975) * np.sqrt(share * (1 - share) / n)
    assert found.share[0] == pytest.approx(share)
    assert found.share_low[0] == pytest.approx(share - half, abs=0.01)
    assert found.share_high[0] == pytest.approx(share + half, abs=0.01)
    chosen = layers[left]
    assert found.mean_layer[0] == pytest.approx(chosen.mean())
    spread = stats.norm.ppf(0.975) * chosen.std() / np.sqrt(chosen.size)
    assert found.mean_layer_low[0] == pytest.approx(chosen.mean() - spread, abs=0.15)
    assert found.mean_layer_high[0] == pytest.approx(chosen.mean() + spread, abs=0.15)
    assert found.defined_share[0] == 1.0
    assert found.defined_share[1] == pytest.approx(1 - 0.9**10, abs=0.025)
    assert found.mean_layer[1] == found.mean_layer_low[1] == found.mean_layer_high[1] == 7
    never = bifurcation_intervals(np.array([-1, -1, -1]), ["x"] * 3, n_boot=20)
    assert never.share[0] == 0 and np.isnan(never.mean_layer[0]) and never.defined_share[0] == 0


def _trajectories(rng, n_per, n_layers=6):
    """Prompts whose PC1 rises with the layer and whose PC2 is set by the category plus noise."""
    names = ["story", "middle", "code"]
    categories = [name for name in names for _ in range(n_per)]
    offsets = np.repeat([-2.0, 0.0, 2.0], n_per)
    depth = np.arange(n_layers, dtype=float)
    pc1 = depth[None, :] + rng.normal(0, 0.8, size=(len(categories), n_layers))
    pc2 = offsets[:, None] + rng.normal(0, 1.0, size=(len(categories), n_layers))
    return np.stack([pc1, pc2], axis=2), categories, offsets


def test_depth_spearman_against_scipy():
    rng = np.random.default_rng(6)
    projection, categories, _ = _trajectories(rng, 8)
    rows = component_readings(projection, range(6), categories, n_boot=200)
    depth = {row["component"]: row for row in rows if row["reading"] == "depth_spearman"}
    for component in (0, 1):
        by_scipy = [stats.spearmanr(np.arange(6), projection[p, :, component]).statistic
                    for p in range(len(categories))]
        assert depth[f"pc{component + 1}"]["value"] == pytest.approx(np.mean(by_scipy))
        assert depth[f"pc{component + 1}"]["low"] <= np.mean(by_scipy) <= depth[f"pc{component + 1}"]["high"]
    assert depth["pc1"]["value"] > 0.8 and abs(depth["pc2"]["value"]) < 0.3


def test_category_share_against_a_hand_computation_and_an_index_bootstrap():
    rng = np.random.default_rng(8)
    projection, categories, _ = _trajectories(rng, 30, n_layers=3)
    labels = np.asarray(categories)
    rows = component_readings(projection, [0, 5, 9], categories, n_boot=3000, seed=1)
    share = {(row["component"], row["layer"]): row for row in rows if row["reading"] == "category_share"}

    def eta_squared(x, groups):
        between = sum(np.sum(groups == g) * (x[groups == g].mean() - x.mean()) ** 2 for g in set(groups))
        return between / np.sum((x - x.mean()) ** 2)

    x = projection[:, 1, 1]  # PC2 at the second projected layer (layer 5)
    reading = share[("pc2", 5)]
    assert reading["value"] == pytest.approx(eta_squared(x, labels))
    # The same bootstrap, written as explicit index resampling within categories with another generator.
    other = np.random.default_rng(99)
    members = [np.flatnonzero(labels == g) for g in ("story", "middle", "code")]
    boot = []
    for _ in range(3000):
        picks = np.concatenate([other.choice(m, m.size) for m in members])
        boot.append(eta_squared(x[picks], labels[picks]))
    assert reading["low"] == pytest.approx(np.quantile(boot, 0.025), abs=0.02)
    assert reading["high"] == pytest.approx(np.quantile(boot, 0.975), abs=0.02)


def test_category_share_chance_is_its_mean_without_a_category_effect():
    rng = np.random.default_rng(11)
    categories = [name for name in ("a", "b", "c") for _ in range(10)]
    values = []
    for _ in range(400):
        rows = component_readings(rng.normal(size=(30, 2, 2)), [0, 1], categories, n_boot=1)
        shares = [row for row in rows if row["reading"] == "category_share"]
        values.extend(row["value"] for row in shares)
    assert shares[0]["chance"] == pytest.approx(2 / 29)
    assert np.mean(values) == pytest.approx(2 / 29, abs=0.006)


def test_axis_correlation_against_pearson_and_fisher():
    rng = np.random.default_rng(10)
    projection, categories, offsets = _trajectories(rng, 150, n_layers=2)
    scores = np.repeat((offsets[:, None] + rng.normal(0, 1.0, size=(len(categories), 1))), 2, axis=1)
    scores[0] = np.nan  # a prompt without a score (it fitted the axis) is left out
    rows = component_readings(projection, [0, 1], categories, scores, n_boot=3000)
    reading = next(r for r in rows if r["reading"] == "axis_correlation" and r["component"] == "pc2"
                   and r["layer"] == 1)
    r = stats.pearsonr(projection[1:, 1, 1], scores[1:, 1]).statistic
    assert reading["value"] == pytest.approx(r) and reading["prompts"] == len(categories) - 1
    # Fisher's z interval for a correlation: the percentile bootstrap should land close to it for n ~ 450.
    z, error = np.arctanh(r), 1 / np.sqrt(len(categories) - 4)
    assert reading["low"] == pytest.approx(np.tanh(z - 1.96 * error), abs=0.03)
    assert reading["high"] == pytest.approx(np.tanh(z + 1.96 * error), abs=0.03)


def test_readings_refuse_mismatched_shapes():
    projection = np.zeros((4, 3, 2))
    with pytest.raises(ValueError, match="layers"):
        component_readings(projection, [0, 1], ["a"] * 4, n_boot=5)
    with pytest.raises(ValueError, match="categories"):
        component_readings(projection, [0, 1, 2], ["a"] * 3, n_boot=5)
    with pytest.raises(ValueError, match="one bifurcation layer per prompt"):
        bifurcation_intervals(np.zeros(3), ["a"] * 4)


def test_per_category_separation_matches_sklearn_and_the_floor_is_reported():
    rng = np.random.default_rng(12)
    states = np.concatenate([rng.normal(c, 1.0, size=(7, 2, 5)) for c in (0.0, 1.5, 3.0)])
    categories = [name for name in ("a", "b", "c") for _ in range(7)]
    result = separation_by_layer(states, categories, n_permutations=99)
    assert result["p_value_floor"] == pytest.approx(0.01)
    assert np.all(result["p_value"] >= result["p_value_floor"])
    found = category_intervals(result["silhouette_by_prompt"], categories, n_boot=200)
    labels = np.asarray(categories)
    for layer in range(2):
        by_sklearn = silhouette_samples(states[:, layer], labels, metric="cosine")
        for index, name in enumerate(found.names):
            assert found.mean[index, layer] == pytest.approx(by_sklearn[labels == name].mean())
    assert np.isnan(separation_by_layer(states, categories, n_permutations=0)["p_value_floor"])


def test_analysis_writes_every_interval_table(tmp_path):
    from tokentrail.analysis.pipeline import AnalysisOptions, analyze_states
    from tokentrail.metrics import write_metrics

    rng = np.random.default_rng(14)
    categories = ["story"] * 8 + ["middle"] * 6 + ["code"] * 8
    states = rng.normal(size=(len(categories), 4, 12)) + np.repeat([0.0, 1.0, 2.0], [8, 6, 8])[:, None, None]
    options = AnalysisOptions(axis=("story", "code"), holdout=True, n_permutations=19, n_bootstrap=300)
    result = analyze_states(states, None, categories, options)
    # --holdout: the 4 + 4 prompts that fitted the axis have no score, so they are not in the intervals.
    assert list(result.axis_intervals.counts) == [4, 6, 4]
    write_metrics(result, [f"p{i}" for i in range(len(categories))], categories, tmp_path)
    metrics = tmp_path / "metrics"
    headers = {name: (metrics / name).read_text().splitlines()[0] for name in (
        "category_separation.csv", "bifurcation_intervals.csv", "components.csv", "separation.csv")}
    assert headers["category_separation.csv"].startswith("category,layer,prompts,silhouette,silhouette_low")
    assert headers["bifurcation_intervals.csv"].startswith("category,prompts,bifurcating,share,share_low")
    assert headers["components.csv"] == "component,reading,layer,value,low,high,prompts,chance"
    assert headers["separation.csv"].endswith("chance,p_value_floor")
    summary = result.summary
    assert summary["p_value_floor"] == pytest.approx(0.05)
    assert set(summary["components"]["pc1"]) == {"depth_spearman", "category_share_last_layer",
                                                 "axis_correlation_last_layer"}
    assert len(summary["bifurcation"]["by_category"]["story"]["share_interval"]) == 2
    # No resamples: none of the interval tables, and a stale one from before is removed.
    plain = analyze_states(states, None, categories, AnalysisOptions(axis=("story", "code"), n_permutations=0,
                                                                     n_bootstrap=0))
    write_metrics(plain, [f"p{i}" for i in range(len(categories))], categories, tmp_path)
    assert not (metrics / "components.csv").exists() and not (metrics / "bifurcation_intervals.csv").exists()


def _analysed(n_bootstrap=300):
    from tokentrail.analysis.pipeline import AnalysisOptions, analyze_states
    from tokentrail.viz import FigureMeta

    rng = np.random.default_rng(16)
    categories = ["story"] * 6 + ["middle"] * 5 + ["code"] * 6
    shift = np.repeat([0.0, 1.0, 2.0], [6, 5, 6])[:, None, None]
    states = rng.normal(size=(len(categories), 5, 10)) + shift * np.linspace(0, 1, 5)[None, :, None]
    result = analyze_states(states, None, categories, AnalysisOptions(axis=("story", "code"), n_permutations=9,
                                                                      n_bootstrap=n_bootstrap))
    meta = FigureMeta(prompt_ids=[f"p{i}" for i in range(len(categories))], categories=categories,
                      prompts=[f"text {i}" for i in range(len(categories))],
                      labels=[""] * len(categories), model_name="tiny")
    return result, meta


def _gid(fig, gid):
    return next(a for a in fig.findobj(lambda a: a.get_gid() == gid))


def test_intervals_figure_draws_each_reading_at_its_interval(tmp_path):
    from tokentrail.viz import static

    result, meta = _analysed()
    fig = static.draw_intervals(result, meta)
    found = result.axis_intervals
    for c, name in enumerate(found.names):
        bar = _gid(fig, f"axis-interval-{name}")
        np.testing.assert_allclose(bar.get_xdata(), [found.low[c, -1], found.high[c, -1]])
        assert bar.get_ydata()[0] == found.rank[c, -1] - 1  # lowest mean at the bottom row
    share = result.bifurcation_intervals
    for c, name in enumerate(share.names):
        np.testing.assert_allclose(_gid(fig, f"bifurcation-interval-{name}").get_xdata(),
                                   [share.share_low[c], share.share_high[c]])
    assert _gid(fig, "category-share-pc1") is not None
    written = static.plot_intervals(result, meta, tmp_path / "intervals")
    assert [p.name for p in written] == ["intervals.png", "intervals.svg"]
    plain, _ = _analysed(n_bootstrap=0)
    assert static.draw_intervals(plain, meta) is None
    assert static.plot_intervals(plain, meta, tmp_path / "none") == []


def test_dynamics_axis_panel_bands_are_the_intervals_not_the_spread():
    from tokentrail.viz import static

    result, meta = _analysed()
    fig = static.draw_dynamics(result, meta)
    found = result.axis_intervals
    for c, name in enumerate(found.names):
        band = _gid(fig, f"interval-{name}")
        ys = band.get_paths()[0].vertices[:, 1]
        assert ys.min() == pytest.approx(np.min(found.low[c])) and ys.max() == pytest.approx(np.max(found.high[c]))
