"""Layer specs, normalisation and TrajectoryPCA, checked against sklearn's PCA on the reshaped matrix."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.decomposition import PCA

from tokentrail.analysis.projection import TrajectoryPCA, normalize_states, parse_layer_spec


def structured_states(n_prompts: int = 12, n_layers: int = 7, hidden: int = 20, seed: int = 0) -> np.ndarray:
    """Trajectories on a 3-D subspace with growing norm plus a little noise: clear, well-separated PCs."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.normal(size=(hidden, 3)))[0].T  # [3, hidden], orthonormal
    depth = np.linspace(1.0, 4.0, n_layers)
    coords = np.stack(
        [
            8.0 * depth[None, :] + rng.normal(0, 0.3, (n_prompts, n_layers)),
            3.0 * rng.normal(size=(n_prompts, 1)) * depth[None, :],
            1.0 * rng.normal(size=(n_prompts, n_layers)),
        ],
        axis=-1,
    )
    return (coords @ basis + rng.normal(0, 0.01, (n_prompts, n_layers, hidden))).astype(np.float32)


def sign_aligned(reference: np.ndarray, candidate_components: np.ndarray) -> np.ndarray:
    """Per-component signs that turn sklearn's components into the candidate's."""
    return np.sign(np.sum(reference * candidate_components, axis=1))


# -------------------------------------------------------------------------------------------- layer specs


def test_zero_to_L_reproduces_hidden_states_without_the_last():
    np.testing.assert_array_equal(parse_layer_spec("0:L", 31), np.arange(30))
    stack = np.arange(31)
    np.testing.assert_array_equal(stack[parse_layer_spec("0:L", 31)], stack[:-1])


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (None, list(range(6))),
        ("all", list(range(6))),
        ("", list(range(6))),
        (":", list(range(6))),
        ("2:", [2, 3, 4, 5]),
        (":3", [0, 1, 2]),
        ("1:L", [1, 2, 3, 4]),
        ("0:6", list(range(6))),
        ("0:L:2", [0, 2, 4]),
        ("0,2,5", [0, 2, 5]),
        (" 0, 2 ,L ", [0, 2, 5]),
        ("L", [5]),
        ("-1", [5]),
        ("-2:", [4, 5]),
        ("0:2,4", [0, 1, 4]),
        ("l", [5]),
    ],
)
def test_layer_spec_forms(spec, expected):
    result = parse_layer_spec(spec, 6)
    assert result.dtype.kind == "i"
    assert result.tolist() == expected


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("0:40", "out of range"),
        ("7", "out of range"),
        ("-7", "out of range"),
        ("abc", "not a layer index"),
        ("1,1", "more than once"),
        ("0:3,2", "more than once"),
        ("3:1", "selects no layers"),
        ("0,,2", "empty item"),
        ("0:4:0", "cannot be 0"),
        ("0:1:2:3", "too many"),
    ],
)
def test_layer_spec_errors_are_one_line(spec, message):
    with pytest.raises(ValueError, match=message) as info:
        parse_layer_spec(spec, 6)
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------------------ normalisation


def test_normalize_states_modes():
    rng = np.random.default_rng(1)
    states = rng.normal(size=(3, 4, 10)).astype(np.float32)
    states[0, 0] = 0.0
    rms = normalize_states(states, "rms")
    unit = normalize_states(states, "unit")
    for p in range(3):
        for layer in range(4):
            x = states[p, layer].astype(np.float64)
            scale_rms = np.sqrt(np.mean(x**2))
            scale_unit = np.sqrt(np.sum(x**2))
            np.testing.assert_allclose(rms[p, layer], x / scale_rms if scale_rms else x, rtol=1e-12)
            np.testing.assert_allclose(unit[p, layer], x / scale_unit if scale_unit else x, rtol=1e-12)
    np.testing.assert_array_equal(rms[0, 0], 0.0)
    np.testing.assert_array_equal(normalize_states(states, "none"), states.astype(np.float64))
    with pytest.raises(ValueError, match="normalize must be one of"):
        normalize_states(states, "l2")


# ----------------------------------------------------------------------------------------------------- PCA


@pytest.mark.parametrize("n_components", [2, 3])
def test_global_raw_pca_matches_sklearn_up_to_sign(n_components):
    states = structured_states()
    rows = states.reshape(-1, states.shape[-1]).astype(np.float64)
    reference = PCA(n_components).fit(rows)

    pca = TrajectoryPCA(n_components=n_components).fit(states)
    signs = sign_aligned(reference.components_, pca.components_)
    assert np.all(np.abs(signs) == 1)
    np.testing.assert_allclose(pca.components_, reference.components_ * signs[:, None], atol=1e-6)
    np.testing.assert_allclose(pca.explained_variance_ratio_, reference.explained_variance_ratio_, rtol=1e-6)
    expected = (reference.transform(rows) * signs).reshape(states.shape[0], states.shape[1], n_components)
    np.testing.assert_allclose(pca.transform(states), expected, atol=1e-4)
    assert pca.layer_means_ is None


def test_sign_rule_largest_loading_is_positive():
    states = structured_states(seed=3)
    for normalize in ("none", "rms", "unit"):
        for center in ("global", "per-layer"):
            components = TrajectoryPCA(3, normalize, center).fit(states).components_
            for component in components:
                assert component[np.argmax(np.abs(component))] > 0


def test_rms_per_layer_pca_matches_manual_computation():
    states = structured_states(seed=5)
    x = states.astype(np.float64)
    x = x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True))
    layer_means = x.mean(axis=0)
    centred = x - layer_means
    reference = PCA(2).fit(centred.reshape(-1, x.shape[-1]))

    pca = TrajectoryPCA(2, normalize="rms", center="per-layer")
    projection = pca.fit_transform(states)
    signs = sign_aligned(reference.components_, pca.components_)
    np.testing.assert_allclose(pca.layer_means_, layer_means, atol=1e-12)
    np.testing.assert_allclose(pca.explained_variance_ratio_, reference.explained_variance_ratio_, rtol=1e-8)
    expected = (reference.transform(centred.reshape(-1, x.shape[-1])) * signs).reshape(*states.shape[:2], 2)
    np.testing.assert_allclose(projection, expected, atol=1e-8)
    # Per-layer centring removes the shared drift: every layer's projection averages to zero.
    np.testing.assert_allclose(projection.mean(axis=0), 0.0, atol=1e-8)


def test_fit_on_subset_uses_that_subsets_layer_means_for_everyone():
    states = structured_states(seed=7)
    fit_mask = np.arange(len(states)) < 8
    x = states.astype(np.float64)
    layer_means = x[fit_mask].mean(axis=0)
    reference = PCA(2).fit((x[fit_mask] - layer_means).reshape(-1, x.shape[-1]))

    pca = TrajectoryPCA(2, center="per-layer").fit(states, fit_mask=fit_mask)
    signs = sign_aligned(reference.components_, pca.components_)
    np.testing.assert_allclose(pca.layer_means_, layer_means, atol=1e-12)
    expected = (reference.transform((x - layer_means).reshape(-1, x.shape[-1])) * signs).reshape(
        *states.shape[:2], 2
    )
    np.testing.assert_allclose(pca.transform(states), expected, atol=1e-8)


def test_reruns_are_bit_identical():
    states = structured_states(seed=11)
    first = TrajectoryPCA(3, "rms", "per-layer").fit_transform(states)
    second = TrajectoryPCA(3, "rms", "per-layer").fit_transform(states.copy())
    assert first.tobytes() == second.tobytes()


def _assert_same_basis(a: TrajectoryPCA, b: TrajectoryPCA, states: np.ndarray) -> None:
    # Same sign rule, so no sign alignment is needed: the components themselves must agree.
    np.testing.assert_allclose(np.abs(np.sum(a.components_ * b.components_, axis=1)), 1.0, atol=1e-6)
    np.testing.assert_allclose(a.components_, b.components_, atol=1e-3)
    np.testing.assert_allclose(a.explained_variance_ratio_, b.explained_variance_ratio_, atol=1e-4)
    np.testing.assert_allclose(a.transform(states), b.transform(states), atol=1e-2)


@pytest.mark.parametrize("center", ["global", "per-layer"])
def test_incremental_fit_is_close_to_the_full_fit(center):
    states = structured_states(n_prompts=40, seed=13)
    full = TrajectoryPCA(3, "none", center).fit(states)
    incremental = TrajectoryPCA(3, "none", center, incremental=True, batch_size=17).fit(states)
    _assert_same_basis(full, incremental, states)


@pytest.mark.parametrize("center", ["global", "per-layer"])
def test_streaming_fit_is_close_to_the_full_fit(center):
    states = structured_states(n_prompts=40, seed=17)
    calls = []

    def make_batches():
        calls.append(1)
        # Uneven batches, one of a single prompt, to exercise the buffering.
        for start, stop in [(0, 1), (1, 9), (9, 10), (10, 33), (33, 40)]:
            yield states[start:stop]

    full = TrajectoryPCA(3, "rms", center).fit(states)
    streamed = TrajectoryPCA(3, "rms", center, batch_size=20).fit_stream(make_batches)
    _assert_same_basis(full, streamed, states)
    assert len(calls) == (2 if center == "per-layer" else 1)
    if center == "per-layer":
        np.testing.assert_allclose(streamed.layer_means_, full.layer_means_, atol=1e-12)


def test_streaming_tiny_batches_below_n_components():
    states = structured_states(n_prompts=6, n_layers=1, seed=19)
    streamed = TrajectoryPCA(3, batch_size=1).fit_stream(lambda: (states[i : i + 1] for i in range(6)))
    full = TrajectoryPCA(3).fit(states)
    np.testing.assert_allclose(np.abs(np.sum(full.components_ * streamed.components_, axis=1)), 1.0, atol=1e-5)


def test_errors():
    states = structured_states()
    with pytest.raises(ValueError, match="at least 2 states"):
        TrajectoryPCA(1).fit(states[:1, :1])
    with pytest.raises(ValueError, match="at least 2 states"):
        TrajectoryPCA(2).fit(states, fit_mask=np.zeros(len(states), dtype=bool))
    with pytest.raises(ValueError, match="n_components=5"):
        TrajectoryPCA(5).fit(states[:1, :3])
    with pytest.raises(ValueError, match="normalize must be one of"):
        TrajectoryPCA(normalize="zscore")
    with pytest.raises(ValueError, match="center must be one of"):
        TrajectoryPCA(center="none")
    with pytest.raises(ValueError, match="n_components"):
        TrajectoryPCA(0)
    with pytest.raises(ValueError, match="batch_size"):
        TrajectoryPCA(batch_size=0)
    with pytest.raises(ValueError, match="not fitted"):
        TrajectoryPCA().transform(states)
    with pytest.raises(ValueError, match="fit_mask"):
        TrajectoryPCA().fit(states, fit_mask=np.ones(3, dtype=bool))
    with pytest.raises(ValueError, match=r"\[prompts, layers, hidden\]"):
        TrajectoryPCA().fit(states[0])
    per_layer = TrajectoryPCA(center="per-layer").fit(states)
    with pytest.raises(ValueError, match="per-layer centring was fitted on 7 layers"):
        per_layer.transform(states[:, :5])
    with pytest.raises(ValueError, match="yielded nothing"):
        TrajectoryPCA().fit_stream(lambda: iter([]))
    # Global centring projects any number of layers, e.g. a single extra state.
    assert TrajectoryPCA().fit(states).transform(states[:, :1]).shape == (len(states), 1, 2)


def test_streaming_fit_matches_sklearn_with_a_large_common_offset():
    # Residual states share a large offset (a few huge dimensions); the covariance must still be exact.
    rng = np.random.default_rng(23)
    states = structured_states(n_prompts=60, n_layers=5, hidden=12, seed=23)
    states = states + 1e4 * rng.standard_normal(12)
    rows = states.reshape(-1, 12)
    reference = PCA(4, svd_solver="full").fit(rows)
    streamed = TrajectoryPCA(4).fit_stream(lambda: (states[i : i + 7] for i in range(0, 60, 7)))
    np.testing.assert_allclose(np.abs(np.sum(reference.components_ * streamed.components_, axis=1)), 1.0, atol=1e-8)
    np.testing.assert_allclose(streamed.explained_variance_, reference.explained_variance_, rtol=1e-7)
    np.testing.assert_allclose(streamed.explained_variance_ratio_, reference.explained_variance_ratio_, rtol=1e-7)
    np.testing.assert_allclose(streamed.mean_, reference.mean_, rtol=1e-12)


@pytest.mark.parametrize("normalize", ["none", "rms"])
def test_streaming_fit_leaves_the_callers_batches_alone(normalize):
    states = structured_states(n_prompts=10, seed=29).astype(np.float64)
    kept = states.copy()
    TrajectoryPCA(2, normalize, "per-layer").fit_stream(lambda: (states[i : i + 3] for i in range(0, 10, 3)))
    TrajectoryPCA(2, normalize, "global", incremental=True, batch_size=5).fit(states)
    np.testing.assert_array_equal(states, kept)
