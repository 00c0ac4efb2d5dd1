"""Layer selection, normalisation and a PCA of whole trajectories.

A trajectory is one prompt's states at a list of layers, `states[prompt, layer, hidden]`. The PCA treats every
(prompt, layer) state as one sample, so all layers share one basis and a trajectory can be drawn as a path.

Two views are useful and both are available through the options:

* raw + global centring: what the seed plotted. PC1 is then mostly the norm growth with depth.
* rms + per-layer centring ("depth view"): each state is divided by its root-mean-square, as the model's own
  final norm does (without its learned weight), and the mean over prompts at each layer is subtracted, so the
  drift that all prompts share is gone and what is left is how prompts differ from each other at that depth.

Sign rule: PCA components are only defined up to sign, so after fitting each component is flipped so that its
entry with the largest absolute loading is positive (the first such entry on ties). Reruns on the same data
therefore give identical numbers, and the incremental fit agrees in sign with the full one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import sklearn
from sklearn.decomposition import PCA

NORMALIZE_MODES = ("none", "rms", "unit")
CENTER_MODES = ("global", "per-layer")

# sklearn >= 1.5 can diagonalise the hidden x hidden covariance instead of taking the SVD of the whole
# (prompts x layers) x hidden matrix: just as exact and deterministic, and many times faster when there are far
# more states than dimensions, which is the usual case.
_HAS_COVARIANCE_EIGH = tuple(int(part) for part in sklearn.__version__.split(".")[:2]) >= (1, 5)


# ------------------------------------------------------------------------------------------- layer specs


def _parse_layer_bound(token: str, n_layers: int, spec: str) -> int:
    token = token.strip()
    if token.upper() == "L":
        return n_layers - 1
    try:
        return int(token)
    except ValueError:
        raise ValueError(
            f"layer spec {spec!r}: {token!r} is not a layer index (use integers, 'L' for the last layer, "
            f"'a:b' ranges or comma lists)"
        ) from None


def _range_error(spec: str, value: int, n_layers: int) -> ValueError:
    return ValueError(
        f"layer spec {spec!r}: {value} is out of range for {n_layers} layers (0..{n_layers - 1}, L={n_layers - 1})"
    )


def _parse_layer_slice(part: str, n_layers: int, spec: str) -> list[int]:
    pieces = part.split(":")
    if len(pieces) > 3:
        raise ValueError(f"layer spec {spec!r}: {part!r} has too many ':' (use a:b or a:b:step)")
    start = _parse_layer_bound(pieces[0], n_layers, spec) if pieces[0].strip() else None
    stop = _parse_layer_bound(pieces[1], n_layers, spec) if pieces[1].strip() else None
    step = _parse_layer_bound(pieces[2], n_layers, spec) if len(pieces) == 3 and pieces[2].strip() else None
    # Python would clamp an out-of-range bound silently; a typo such as 0:300 should be reported instead.
    if start is not None and not -n_layers <= start < n_layers:
        raise _range_error(spec, start, n_layers)
    if stop is not None and not -n_layers <= stop <= n_layers:
        raise _range_error(spec, stop, n_layers)
    if step == 0:
        raise ValueError(f"layer spec {spec!r}: a slice step cannot be 0")
    return list(range(n_layers)[slice(start, stop, step)])


def parse_layer_spec(spec: str | None, n_layers: int) -> np.ndarray:
    """Layer indices selected by `spec` out of `n_layers` stored layers (0 = embeddings, L = last block).

    Forms: None, "" or "all" (every layer); "a:b" and "a:b:step" with Python slice semantics, where "L" means
    n_layers - 1 and either bound may be left out; single indices; comma lists of any of these ("0,5,10",
    "0:3,L"); negative indices count from the end. "0:L" selects layers 0..L-1, which is exactly the seed's
    `output_hidden_states[:-1]`. Indices come back in the order given; a layer named twice, an out-of-range
    index or an empty selection raises ValueError.
    """
    if n_layers < 1:
        raise ValueError(f"cannot select layers out of {n_layers} layers")
    if spec is None:
        return np.arange(n_layers)
    text = str(spec).strip()
    if text == "" or text.lower() == "all":
        return np.arange(n_layers)
    selected: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            raise ValueError(f"layer spec {spec!r}: empty item between commas")
        if ":" in part:
            selected.extend(_parse_layer_slice(part, n_layers, text))
            continue
        index = _parse_layer_bound(part, n_layers, text)
        if not -n_layers <= index < n_layers:
            raise _range_error(text, index, n_layers)
        selected.append(index % n_layers)
    if not selected:
        raise ValueError(f"layer spec {spec!r} selects no layers out of {n_layers}")
    if len(set(selected)) != len(selected):
        raise ValueError(f"layer spec {spec!r} names a layer more than once")
    return np.asarray(selected, dtype=int)


# ------------------------------------------------------------------------------------------ normalisation


def normalize_states(states: np.ndarray, mode: str) -> np.ndarray:
    """Each hidden vector (last axis) normalised: "none", "rms" (x / sqrt(mean(x**2))) or "unit" (x / ||x||).

    Returns float64. A zero vector stays zero rather than becoming nan: it has no direction to keep.
    """
    if mode not in NORMALIZE_MODES:
        raise ValueError(f"normalize must be one of {', '.join(NORMALIZE_MODES)}, not {mode!r}")
    values = np.array(states, dtype=np.float64)  # always a copy, and only one
    if mode == "none":
        return values
    if mode == "rms":
        scale = np.sqrt(np.mean(values**2, axis=-1, keepdims=True))
    else:
        scale = np.linalg.norm(values, axis=-1, keepdims=True)
    return values / np.where(scale > 0, scale, 1.0)


# ----------------------------------------------------------------------------------------------------- PCA


def _fix_signs(components: np.ndarray) -> np.ndarray:
    largest = np.argmax(np.abs(components), axis=1)
    signs = np.sign(components[np.arange(len(components)), largest])
    signs[signs == 0] = 1.0
    return components * signs[:, None]


def _as_trajectories(states: np.ndarray) -> np.ndarray:
    values = np.asarray(states)
    if values.ndim != 3:
        raise ValueError(f"states must be [prompts, layers, hidden], got shape {values.shape}")
    return values


class _ScatterSum:
    """Running count, mean and centred scatter matrix (sum of outer products) of the rows seen so far.

    Batches are merged with the pairwise update of Chan, Golub and LeVeque: each batch is centred on its own
    mean before its scatter is taken, so the sum never subtracts two large nearly equal numbers, which the
    naive sum of x x^T minus n mean mean^T would do for residual states with a large common offset. The result
    is the exact covariance of all rows (up to float64 rounding) in hidden x hidden memory, whatever the
    number of rows; one eigendecomposition at the end replaces IncrementalPCA's SVD per batch.
    """

    def __init__(self, hidden: int) -> None:
        self.count = 0
        self.mean = np.zeros(hidden)
        self.scatter = np.zeros((hidden, hidden))

    def add(self, rows: np.ndarray, overwrite: bool = False) -> None:
        """Merge `rows [n, hidden]` in; `overwrite=True` lets it centre a float64 `rows` in place (less memory)."""
        n = len(rows)
        if n == 0:
            return
        rows = np.asarray(rows, dtype=np.float64)
        batch_mean = rows.mean(axis=0)
        if overwrite:
            rows -= batch_mean
            centred = rows
        else:
            centred = rows - batch_mean
        total = self.count + n
        shift = batch_mean - self.mean
        self.scatter += centred.T @ centred + np.outer(shift, shift) * (self.count * n / total)
        self.mean += shift * (n / total)
        self.count = total


class TrajectoryPCA:
    """PCA of trajectories `[prompts, layers, hidden]` with the normalisation and centring options above.

    `fit(states, fit_mask)` learns the basis from the prompts where `fit_mask` is true (all by default);
    `transform` projects any prompts into it, using the layer means learned at fit time when centring per
    layer. `incremental=True` accumulates the covariance over chunks of `batch_size` rows (states) instead
    of handing every row to one solver, and `fit_stream` does the same over batches that never need to be in
    memory together; both keep only a hidden x hidden matrix and give the same basis as the full fit.

    Attributes after fitting: `components_ [k, hidden]` (signs fixed as the module describes),
    `explained_variance_ratio_ [k]`, `explained_variance_ [k]`, `mean_ [hidden]` (the mean removed before
    projecting, after any per-layer centring), `layer_means_ [layers, hidden]` (None for global centring) and
    `n_layers_`.
    """

    def __init__(
        self,
        n_components: int = 2,
        normalize: str = "none",
        center: str = "global",
        incremental: bool = False,
        batch_size: int | None = None,
    ) -> None:
        if int(n_components) != n_components or n_components < 1:
            raise ValueError(f"n_components must be a positive integer, not {n_components!r}")
        if normalize not in NORMALIZE_MODES:
            raise ValueError(f"normalize must be one of {', '.join(NORMALIZE_MODES)}, not {normalize!r}")
        if center not in CENTER_MODES:
            raise ValueError(f"center must be one of {', '.join(CENTER_MODES)}, not {center!r}")
        if batch_size is not None and (int(batch_size) != batch_size or batch_size < 1):
            raise ValueError(f"batch_size must be a positive integer or None, not {batch_size!r}")
        self.n_components = int(n_components)
        self.normalize = normalize
        self.center = center
        self.incremental = incremental
        self.batch_size = batch_size
        self.components_: np.ndarray | None = None
        self.explained_variance_ratio_: np.ndarray | None = None
        self.explained_variance_: np.ndarray | None = None
        self.mean_: np.ndarray | None = None
        self.layer_means_: np.ndarray | None = None
        self.n_layers_: int | None = None

    # --- fitting ----------------------------------------------------------------------------------------

    def _check_sample_count(self, n_samples: int, n_features: int) -> None:
        if n_samples < 2:
            raise ValueError(f"PCA needs at least 2 states to fit, got {n_samples}")
        if self.n_components > min(n_samples, n_features):
            raise ValueError(
                f"n_components={self.n_components} is more than the {n_samples} states x {n_features} "
                f"dimensions allow"
            )

    def _store_fit(self, model: PCA) -> None:
        self.components_ = _fix_signs(np.asarray(model.components_, dtype=np.float64))
        self.explained_variance_ratio_ = np.asarray(model.explained_variance_ratio_, dtype=np.float64)
        self.explained_variance_ = np.asarray(model.explained_variance_, dtype=np.float64)
        self.mean_ = np.asarray(model.mean_, dtype=np.float64)

    def _store_scatter(self, scatter: _ScatterSum) -> None:
        self._check_sample_count(scatter.count, len(scatter.mean))
        # eigh returns ascending eigenvalues; the covariance is symmetric positive semi-definite, so tiny
        # negative eigenvalues are rounding and count as zero variance.
        eigenvalues, eigenvectors = np.linalg.eigh(scatter.scatter / (scatter.count - 1))
        eigenvalues = np.clip(eigenvalues[::-1], 0.0, None)
        total = eigenvalues.sum()
        self.components_ = _fix_signs(eigenvectors[:, ::-1][:, : self.n_components].T.copy())
        self.explained_variance_ = eigenvalues[: self.n_components].copy()
        self.explained_variance_ratio_ = (self.explained_variance_ / total if total > 0
                                          else np.zeros(self.n_components))
        self.mean_ = scatter.mean.copy()

    def fit(self, states: np.ndarray, fit_mask: np.ndarray | None = None) -> TrajectoryPCA:
        values = _as_trajectories(states)
        n_prompts, n_layers, hidden = values.shape
        if fit_mask is None:
            mask = np.ones(n_prompts, dtype=bool)
        else:
            mask = np.asarray(fit_mask, dtype=bool)
            if mask.shape != (n_prompts,):
                raise ValueError(f"fit_mask must have one entry per prompt ({n_prompts}), got shape {mask.shape}")
        fit_states = normalize_states(values[mask], self.normalize)
        self._check_sample_count(fit_states.shape[0] * n_layers, hidden)
        if self.center == "per-layer":
            self.layer_means_ = fit_states.mean(axis=0)
            fit_states = fit_states - self.layer_means_
        else:
            self.layer_means_ = None
        rows = fit_states.reshape(-1, hidden)
        if self.incremental:
            scatter = _ScatterSum(hidden)
            chunk = self.batch_size or len(rows)
            for start in range(0, len(rows), chunk):
                scatter.add(rows[start : start + chunk])
            self._store_scatter(scatter)
        else:
            # Only exact solvers without randomness, so that reruns agree to the last bit.
            tall = rows.shape[0] >= rows.shape[1]
            model = PCA(self.n_components, svd_solver="covariance_eigh" if tall and _HAS_COVARIANCE_EIGH else "full")
            model.fit(rows)
            self._store_fit(model)
        self.n_layers_ = n_layers
        return self

    def fit_stream(self, make_batches: Callable[[], Iterable[np.ndarray]]) -> TrajectoryPCA:
        """Fit incrementally over `make_batches()`, an iterable of `[prompts, layers, hidden]` batches.

        Every prompt yielded is used (filter before yielding to fit on a subset). Per-layer centring needs the
        layer means before the first PCA update, so it calls `make_batches()` twice: once for the means and once
        for the fit. The batches must be the same both times.
        """
        n_layers: int | None = None
        hidden: int | None = None
        if self.center == "per-layer":
            total: np.ndarray | None = None
            count = 0
            for batch in make_batches():
                values = normalize_states(_as_trajectories(batch), self.normalize)
                n_layers, hidden = self._check_batch_shape(values, n_layers, hidden)
                total = values.sum(axis=0) if total is None else total + values.sum(axis=0)
                count += values.shape[0]
            if total is None or count == 0:
                raise ValueError("PCA needs at least 2 states to fit, got 0 (make_batches yielded nothing)")
            self.layer_means_ = total / count
        else:
            self.layer_means_ = None

        scatter: _ScatterSum | None = None
        for batch in make_batches():
            values = normalize_states(_as_trajectories(batch), self.normalize)
            n_layers, hidden = self._check_batch_shape(values, n_layers, hidden)
            if self.layer_means_ is not None:
                values -= self.layer_means_
            if scatter is None:
                scatter = _ScatterSum(hidden)
            scatter.add(values.reshape(-1, hidden), overwrite=True)  # values is this loop's own copy
        if scatter is None or scatter.count == 0 or n_layers is None:
            raise ValueError("PCA needs at least 2 states to fit, got 0 (make_batches yielded nothing)")
        self._store_scatter(scatter)
        self.n_layers_ = n_layers
        return self

    @staticmethod
    def _check_batch_shape(values: np.ndarray, n_layers: int | None, hidden: int | None) -> tuple[int, int]:
        if n_layers is not None and values.shape[1:] != (n_layers, hidden):
            raise ValueError(
                f"every batch must have shape [prompts, {n_layers}, {hidden}], got {values.shape}"
            )
        return values.shape[1], values.shape[2]

    # --- projecting -------------------------------------------------------------------------------------

    def transform(self, states: np.ndarray) -> np.ndarray:
        """Project `[prompts, layers, hidden]` to `[prompts, layers, n_components]`."""
        if self.components_ is None or self.mean_ is None:
            raise ValueError("TrajectoryPCA is not fitted yet: call fit or fit_stream first")
        values = normalize_states(_as_trajectories(states), self.normalize)
        if values.shape[-1] != self.components_.shape[1]:
            raise ValueError(
                f"states have hidden size {values.shape[-1]}, the PCA was fitted on {self.components_.shape[1]}"
            )
        if self.layer_means_ is not None:
            if values.shape[1] != self.layer_means_.shape[0]:
                raise ValueError(
                    f"per-layer centring was fitted on {self.layer_means_.shape[0]} layers, "
                    f"states have {values.shape[1]}"
                )
            values = values - self.layer_means_
        return (values - self.mean_) @ self.components_.T

    def fit_transform(self, states: np.ndarray, fit_mask: np.ndarray | None = None) -> np.ndarray:
        return self.fit(states, fit_mask).transform(states)
