"""2-D maps of routed representations (``RunOutput.representations``, [n, D]): PCA or UMAP, fitted
once, stored without pickle, and able to place new (live) examples on the same map.

Fitting
-------
:func:`fit_projection` fits on at most ``max_fit`` rows. When there are more, it fits on a stratified
random sample (:func:`stratified_indices`; by ``strata`` labels when given, never the head of the
data) and places the other rows with :meth:`FittedProjection.transform`, the very rule used later
for live examples, so the stored map and a live point are placed the same way.

UMAP persistence: k-NN placement, not umap's own ``transform``
----------------------------------------------------------------
A fitted ``umap.UMAP`` holds numba-compiled search structures that only pickle can store. Instead
we store the fitted rows and their 2-D coordinates (``fit_X``, ``fit_coords``) and place a new point
at the weighted mean of the coordinates of its ``n_neighbors`` nearest fitted rows, weighted by
UMAP's fuzzy membership strength ``exp(-d / sigma)`` (sigma calibrated per point so that the weights
sum to log2(k), as UMAP does). That is exactly how ``umap.UMAP.transform`` *initialises* a new point;
umap then refines it with a few epochs of SGD, which we skip. A new point identical to a fitted
row lands exactly on that row's coordinate.

Trade-offs: placement is deterministic, needs no umap/numba import at load (fast in a page), and
does not depend on the umap version that fitted the map (refitting from saved arrays would need
the same umap, numba and seed to reproduce the stored layout). The price: without the SGD
refinement a new point always lands inside the hull of its neighbours' coordinates, so a point
unlike anything fitted still looks "inside" some cluster. ``transform(..., return_distance=True)``
returns the distance to the nearest fitted row so that a page can flag such points.

UMAP runs on exact k-NN from scikit-learn (``precomputed_knn``): that avoids pynndescent's
tens-of-seconds numba compile for n >= 4096 and is fast at these sizes. ``init="pca"``,
``n_epochs=200`` and ``low_memory=True`` keep a 5k x 64 fit to a few seconds on 2 cores; the seed
makes it reproducible (and single-threaded: umap ignores n_jobs when seeded).

Storage
-------
One ``.npz`` file (``allow_pickle=False``): the arrays plus ``meta_json``, a 0-d unicode array holding
the JSON metadata (method, parameters, fit time, versions). Save it into a run with
``proj.save(writer.file_path("projection.npz"))``.
"""

from __future__ import annotations

import importlib.metadata
import json
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.decomposition import PCA
from sklearn.neighbors import NearestNeighbors

from analysis.sampling import stratified_indices  # noqa: E402  (re-exported)

__all__ = [
    "FittedProjection",
    "fit_projection",
    "stratified_indices",
    "knn_membership_weights",
    "METHODS",
    "FORMAT_VERSION",
]

METHODS = ("umap", "pca")
FORMAT_VERSION = 1
_MIN_UMAP_POINTS = 5


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------

# ---------------------------------------------------------------------------------------------
# k-NN placement (UMAP's initialisation of new points)
# ---------------------------------------------------------------------------------------------


def knn_membership_weights(distances: np.ndarray, n_iter: int = 64) -> np.ndarray:
    """UMAP-style fuzzy membership weights ``exp(-d / sigma)`` for each row of k-NN distances [m, k].

    sigma is found by bisection so that each row's weights sum to log2(k) (UMAP's
    ``smooth_knn_dist`` with local_connectivity 0, the setting umap's ``transform`` uses), floored at
    1e-3 x the row's mean distance (UMAP's MIN_K_DIST_SCALE) so that very close neighbours stay finite.
    """
    d = np.asarray(distances, dtype=np.float64)
    if d.shape[1] == 1:  # a single neighbour takes all the weight
        return np.ones_like(d)
    target = np.log2(d.shape[1])
    lo = np.zeros(d.shape[0])
    hi = np.full(d.shape[0], np.inf)
    sigma = np.ones(d.shape[0])
    for _ in range(n_iter):
        total = np.exp(-d / sigma[:, None]).sum(axis=1)
        too_big = total > target  # sigma too large: weights too flat
        hi = np.where(too_big, sigma, hi)
        lo = np.where(too_big, lo, sigma)
        sigma = np.where(np.isinf(hi), sigma * 2, (lo + hi) / 2)
    sigma = np.maximum(sigma, 1e-3 * d.mean(axis=1) + 1e-12)
    return np.exp(-d / sigma[:, None])


def _normalise_rows(X: np.ndarray) -> np.ndarray:
    return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)


# ---------------------------------------------------------------------------------------------
# The fitted projection
# ---------------------------------------------------------------------------------------------


@dataclass
class FittedProjection:
    """A fitted 2-D (``n_components``-D) map.

    ``coords`` [n, c]: the map coordinates of every row given to :func:`fit_projection`, in order;
    ``fit_index`` [m]: which of those rows the projection was fitted on; ``state``: the arrays that
    :meth:`transform` needs (PCA: ``components`` [c, D], ``mean`` [D], ``explained_variance_ratio``;
    UMAP: ``fit_X`` [m, D], ``fit_coords`` [m, c]); ``params``: JSON-friendly settings and fit time.
    """

    method: str
    coords: np.ndarray
    fit_index: np.ndarray
    state: dict[str, np.ndarray]
    params: dict[str, Any]
    _neighbours: Any = field(default=None, init=False, repr=False, compare=False)

    # ---- placing points --------------------------------------------------------------------------
    def transform(self, X: np.ndarray, return_distance: bool = False):
        """Map coordinates [n, c] of new rows; with ``return_distance`` also each row's distance
        to the nearest fitted row (UMAP; for PCA the reconstruction error), to flag unfamiliar points."""
        X = self._check_dim(X)
        if self.method == "pca":
            coords, distance = self._pca_place(X)
        else:
            coords, distance = self._knn_place(X)
        return (coords, distance) if return_distance else coords

    def _check_dim(self, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2 or X.shape[1] != self.params["dim"]:
            raise ValueError(f"expected rows of dim {self.params['dim']}, got shape {X.shape}")
        return X

    def _pca_place(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        centred = X - self.state["mean"]
        coords = centred @ self.state["components"].T
        residual = centred - coords @ self.state["components"]
        return coords, np.linalg.norm(residual, axis=1)

    def _knn_index(self):
        if self._neighbours is None:  # rebuilt on demand: cheap, and never stored
            k = min(self.params["n_neighbors"], len(self.state["fit_X"]))
            self._neighbours = NearestNeighbors(n_neighbors=k, metric=self.params["metric"]).fit(self.state["fit_X"])
        return self._neighbours

    def _knn_place(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        fit_X, fit_coords = self.state["fit_X"], self.state["fit_coords"]
        distances, neighbours = self._knn_index().kneighbors(X)
        weights = knn_membership_weights(distances)
        coords = (weights[:, :, None] * fit_coords[neighbours]).sum(axis=1) / weights.sum(axis=1, keepdims=True)
        nearest = neighbours[:, 0]
        same_as_fitted = self._identical(X, fit_X[nearest])
        coords[same_as_fitted] = fit_coords[nearest[same_as_fitted]]  # a fitted row lands on its own dot
        return coords, distances[:, 0]

    def _identical(self, X: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        X = X.astype(candidates.dtype)  # fit_X is stored as float32
        if self.params["metric"] == "cosine":  # same direction: cosine distance 0
            return np.all(np.isclose(_normalise_rows(X), _normalise_rows(candidates), rtol=0, atol=1e-6), axis=1)
        return np.all(X == candidates, axis=1)

    # ---- storage -------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write one ``.npz`` (no pickle): arrays + ``meta_json``. Returns the path written."""
        path = Path(path)
        meta = {
            "format_version": FORMAT_VERSION,
            "method": self.method,
            "params": self.params,
            "state_keys": sorted(self.state),
        }
        arrays = {f"state_{k}": np.asarray(v) for k, v in self.state.items()}
        with open(path, "wb") as fh:  # a file handle: numpy would otherwise append ".npz" to the name
            np.savez(
                fh,
                coords=self.coords,
                fit_index=self.fit_index,
                meta_json=np.array(json.dumps(meta, sort_keys=True)),
                **arrays,
            )
        return path

    @classmethod
    def load(cls, path: str | Path) -> FittedProjection:
        with np.load(Path(path), allow_pickle=False) as f:
            meta = json.loads(str(f["meta_json"]))
            if meta.get("format_version") != FORMAT_VERSION:
                raise ValueError(
                    f"{path}: projection format {meta.get('format_version')!r}, this code reads {FORMAT_VERSION}"
                )
            state = {k: f[f"state_{k}"] for k in meta["state_keys"]}
            return cls(meta["method"], f["coords"], f["fit_index"], state, meta["params"])


# ---------------------------------------------------------------------------------------------
# Fitting
# ---------------------------------------------------------------------------------------------


def _fit_pca(X_fit: np.ndarray, n_components: int, seed: int) -> dict[str, np.ndarray]:
    # Exact either way; the D x D covariance route avoids a (slow, thread-hungry) SVD of the data.
    solver = "covariance_eigh" if X_fit.shape[0] >= X_fit.shape[1] else "full"
    pca = PCA(n_components=n_components, svd_solver=solver, random_state=seed).fit(X_fit)
    return {"components": pca.components_, "mean": pca.mean_, "explained_variance_ratio": pca.explained_variance_ratio_}


@contextmanager
def openmp_threads_kept() -> Iterator[None]:
    """Keep torch's thread count across a numba call (UMAP).

    numba's OpenMP threading layer shares libgomp with torch and sets the process-wide OpenMP thread
    count to its own (every core) when it first runs a parallel function: torch's parallel regions after
    a projection then ran on two threads in a process that had asked for one. Beside another process on
    two cores, the precompute stages after the projection ran 20-25x slower (a QA demo run's randomisation
    check: 67.7 s against 2.9 s alone). Torch's count is put back afterwards (when torch is loaded)."""
    torch = sys.modules.get("torch")
    before = torch.get_num_threads() if torch is not None else None
    try:
        yield
    finally:
        if before is not None:
            torch.set_num_threads(before)


def _fit_umap(
    X_fit: np.ndarray, n_components: int, n_neighbors: int, metric: str, seed: int, n_epochs: int, min_dist: float
) -> dict[str, np.ndarray]:
    import umap  # lazily: importing umap/numba costs seconds, and loading a map never needs it

    # Exact k-NN (self included, as umap expects): skips pynndescent's long numba compile.
    knn_dist, knn_index = NearestNeighbors(n_neighbors=n_neighbors, metric=metric).fit(X_fit).kneighbors(X_fit)
    reducer = umap.UMAP(
        n_neighbors=n_neighbors,
        n_components=n_components,
        metric=metric,
        n_epochs=n_epochs,
        min_dist=min_dist,
        init="pca",
        low_memory=True,
        random_state=seed,
        n_jobs=1,
        precomputed_knn=(knn_index, knn_dist, None),
    )
    with warnings.catch_warnings(), openmp_threads_kept():
        warnings.filterwarnings("ignore", message=".*overridden to 1 by setting random_state.*")
        warnings.filterwarnings("ignore", message=".*precomputed_knn.*")
        coords = reducer.fit_transform(X_fit)
    return {"fit_X": X_fit.astype(np.float32), "fit_coords": np.asarray(coords, dtype=np.float64)}


def fit_projection(
    X: np.ndarray,
    method: str = "umap",
    n_neighbors: int = 15,
    seed: int = 0,
    max_fit: int = 5000,
    strata: Sequence[Any] | None = None,
    *,
    n_components: int = 2,
    metric: str = "euclidean",
    n_epochs: int = 200,
    min_dist: float = 0.1,
) -> FittedProjection:
    """Fit a PCA or UMAP map of ``X`` [n, D] and place every row of ``X`` on it.

    When n > ``max_fit`` the map is fitted on a stratified random sample of ``max_fit`` rows (by
    ``strata``, one label per row) and the other rows are placed with :meth:`FittedProjection.transform`.
    UMAP settings (``n_neighbors``, ``metric`` "euclidean" | "cosine", ``n_epochs``, ``min_dist``) are
    ignored by PCA. Returns the fitted projection; ``params["fit_seconds"]`` says how long fitting took.
    """
    if method not in METHODS:
        raise ValueError(f"unknown projection method {method!r}; choose one of {METHODS}")
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2:
        raise ValueError(f"X must be [n, D], got shape {X.shape}")
    n = len(X)
    fit_index = stratified_indices(n, max_fit, strata, seed)
    X_fit = X[fit_index]
    params: dict[str, Any] = {
        "dim": int(X.shape[1]),
        "n_components": n_components,
        "seed": seed,
        "n_total": n,
        "n_fit": len(fit_index),
        "max_fit": max_fit,
    }
    if method == "umap":
        if len(X_fit) < _MIN_UMAP_POINTS:
            raise ValueError(f"UMAP needs at least {_MIN_UMAP_POINTS} points, got {len(X_fit)}; use method='pca'")
        n_neighbors = max(2, min(n_neighbors, len(X_fit) - 1))
        params.update(
            n_neighbors=n_neighbors,
            metric=metric,
            n_epochs=n_epochs,
            min_dist=min_dist,
            init="pca",
            umap_version=importlib.metadata.version("umap-learn"),
        )
    started = time.perf_counter()  # includes umap's numba compile on a process's first UMAP fit
    if method == "pca":
        state = _fit_pca(X_fit, n_components, seed)
    else:
        state = _fit_umap(X_fit, n_components, n_neighbors, metric, seed, n_epochs, min_dist)
    params["fit_seconds"] = round(time.perf_counter() - started, 3)
    projection = FittedProjection(method, np.zeros((n, n_components)), fit_index, state, params)
    projection.coords = _coords_of_all_rows(projection, X, fit_index)
    return projection


def _coords_of_all_rows(projection: FittedProjection, X: np.ndarray, fit_index: np.ndarray) -> np.ndarray:
    if projection.method == "pca":
        return projection.transform(X)
    coords = np.empty((len(X), projection.params["n_components"]))
    coords[fit_index] = projection.state["fit_coords"]
    rest = np.setdiff1d(np.arange(len(X)), fit_index)
    if len(rest):
        coords[rest] = projection.transform(X[rest])
    return coords
