"""Projections: stratified fit samples, PCA/UMAP persistence without pickle, placing new points."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest

from analysis.embedding import FittedProjection, fit_projection, knn_membership_weights, stratified_indices
from tests.fresh_python import printed_lines


def clustered(n: int, dim: int = 16, n_clusters: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_clusters, dim)) * 6
    labels = np.sort(rng.integers(0, n_clusters, n))  # sorted: the head of the data is one cluster
    return centres[labels] + rng.normal(size=(n, dim)), labels


def test_stratified_sample_covers_every_stratum_and_is_not_the_head():
    strata = ["a"] * 50 + ["b"] * 30 + ["c"] * 3
    picked = stratified_indices(len(strata), 12, strata, seed=0)
    assert len(picked) == 12 and len(set(picked)) == 12
    assert {strata[i] for i in picked} == {"a", "b", "c"}
    assert list(picked) != list(range(12))
    counts = {s: sum(strata[i] == s for i in picked) for s in "abc"}
    assert counts["a"] > counts["b"] > counts["c"] >= 1  # proportional beyond one per stratum
    assert list(stratified_indices(len(strata), 12, strata, seed=0)) == list(picked)  # seeded
    assert list(stratified_indices(5, 10)) == list(range(5))


def test_uniform_sample_is_not_the_head():
    picked = stratified_indices(1000, 20, seed=3)
    assert len(set(picked)) == 20 and picked.max() > 100


def test_pca_save_load_round_trip(tmp_path):
    X, labels = clustered(300)
    projection = fit_projection(X, "pca", max_fit=120, strata=labels)
    assert projection.coords.shape == (300, 2) and len(projection.fit_index) == 120
    assert set(labels[projection.fit_index]) == set(labels)
    path = projection.save(tmp_path / "projection.npz")
    assert path == tmp_path / "projection.npz" and path.exists()
    loaded = FittedProjection.load(path)
    assert loaded.method == "pca" and loaded.params == projection.params
    np.testing.assert_array_equal(loaded.coords, projection.coords)
    np.testing.assert_array_equal(loaded.fit_index, projection.fit_index)
    X_new = np.random.default_rng(1).normal(size=(5, X.shape[1]))
    np.testing.assert_array_equal(loaded.transform(X_new), projection.transform(X_new))
    np.testing.assert_allclose(projection.transform(X[:7]), projection.coords[:7])


def test_saved_file_needs_no_pickle(tmp_path):
    path = fit_projection(clustered(50)[0], "pca").save(tmp_path / "p.npz")
    with zipfile.ZipFile(path) as zf:
        names = set(zf.namelist())
    assert {"coords.npy", "fit_index.npy", "meta_json.npy"} <= names
    with np.load(path, allow_pickle=False) as f:  # raises if any array were an object array
        assert all(f[k].dtype != object for k in f.files)


def test_membership_weights_sum_to_log2_k():
    d = np.abs(np.random.default_rng(0).normal(size=(10, 15))) + 0.5
    d.sort(axis=1)
    np.testing.assert_allclose(knn_membership_weights(d).sum(axis=1), np.log2(15), rtol=1e-6)


def test_umap_places_training_points_on_or_near_their_coordinates(tmp_path):
    X, labels = clustered(400, seed=2)
    projection = fit_projection(X, "umap", n_neighbors=10, max_fit=250, strata=labels, n_epochs=100)
    assert projection.coords.shape == (400, 2) and projection.params["n_fit"] == 250
    fit_X = X[projection.fit_index]
    fitted = projection.coords[projection.fit_index]
    spread = np.linalg.norm(fitted.max(axis=0) - fitted.min(axis=0))
    # A fitted row lands exactly on its own dot; a slightly perturbed one lands close to it.
    np.testing.assert_array_equal(projection.transform(fit_X[:20]), fitted[:20])
    nudged = fit_X[:20] + 0.01 * np.random.default_rng(3).normal(size=fit_X[:20].shape)
    moved = np.linalg.norm(projection.transform(nudged) - fitted[:20], axis=1)
    assert np.median(moved) < 0.05 * spread
    # Rows that were not fitted land beside their own cluster.
    rest = np.setdiff1d(np.arange(400), projection.fit_index)
    centres = {c: fitted[labels[projection.fit_index] == c].mean(axis=0) for c in set(labels)}
    nearest_centre = [min(centres, key=lambda c: np.linalg.norm(projection.coords[i] - centres[c])) for i in rest]
    assert np.mean(np.array(nearest_centre) == labels[rest]) > 0.95
    # The saved map places new points identically after loading.
    loaded = FittedProjection.load(projection.save(tmp_path / "umap.npz"))
    np.testing.assert_array_equal(loaded.transform(nudged), projection.transform(nudged))
    coords, distance = loaded.transform(nudged, return_distance=True)
    assert coords.shape == (20, 2) and np.all(distance < 0.1)


def test_rejects_wrong_dimension_and_unknown_method():
    projection = fit_projection(clustered(40)[0], "pca")
    with pytest.raises(ValueError, match="dim"):
        projection.transform(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="unknown projection method"):
        fit_projection(np.zeros((10, 3)), "tsne")


def test_a_umap_fit_leaves_torchs_thread_count_as_it_was():
    """numba's OpenMP layer (UMAP) shares libgomp with torch and used to leave torch on every core after a
    projection, which made the demo build's later precompute stages 20-25x slower beside another process."""
    code = (
        "import numpy as np, torch\n"
        "torch.set_num_threads(1)\n"
        "torch.randn(10**6).exp()\n"  # torch's OpenMP pool started, as in a precompute
        "from analysis.embedding import fit_projection\n"
        "fit_projection(np.random.default_rng(0).normal(size=(200, 16)).astype(np.float32), method='umap')\n"
        "torch.randn(10**6).exp()\n"
        "print(torch.get_num_threads())\n"
    )
    assert printed_lines(code)[-1] == "1"
