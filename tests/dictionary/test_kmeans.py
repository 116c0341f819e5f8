import logging
import subprocess
import sys
import warnings

import faiss
import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans
from sklearn.datasets import make_blobs
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from ccim_lightning.dictionary.kmeans import MIN_POINTS_PER_CLUSTER, KMeansResult, empty_cluster_moves, kmeans


@pytest.fixture(autouse=True, scope="module")
def one_cpu_thread():
    """One torch and one FAISS (OpenMP) thread: these problems are tiny, and on a CPU shared with other work every
    parallel region waits for a descheduled thread (the module's tests then take minutes instead of seconds)."""
    torch_threads, faiss_threads = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    yield
    torch.set_num_threads(torch_threads)
    faiss.omp_set_num_threads(faiss_threads)


def relu_mixture(n=3000, dim=64, blobs=48, seed=0):
    """Non-negative features with more blobs than clusters, like pooled CNN features: a hard k-means problem."""
    rng = np.random.default_rng(seed)
    labels = rng.choice(blobs, size=n, p=rng.dirichlet(np.full(blobs, 2.0)))
    centres = rng.standard_normal((blobs, dim)).astype(np.float32)
    features = centres[labels] + rng.standard_normal((n, dim)).astype(np.float32)
    return np.maximum(features, 0.0)


def separated_blobs(n=1200, dim=16, centers=12, seed=0):
    features, labels = make_blobs(
        n, n_features=dim, centers=centers, cluster_std=1.0, center_box=(-20, 20), random_state=seed
    )
    return features.astype(np.float32), labels


def reference_inertia(features, centroids, assignments):
    features = np.asarray(features, dtype=np.float64)
    return float(np.square(features - np.asarray(centroids, dtype=np.float64)[assignments]).sum())


def check_partition(result: KMeansResult, features, num_clusters):
    """The invariants every result must satisfy, checked with numpy independently of the implementation."""
    features = np.asarray(features, dtype=np.float64)
    n, d = features.shape
    assert result.centroids.shape == (num_clusters, d) and result.centroids.dtype == torch.float32
    assert result.counts.shape == (num_clusters,) and result.counts.dtype == torch.int64
    assert result.assignments.shape == (n,) and result.assignments.dtype == torch.int64
    assignments = result.assignments.numpy()
    counts = np.bincount(assignments, minlength=num_clusters)
    np.testing.assert_array_equal(result.counts.numpy(), counts)
    assert counts.sum() == n and counts.min() >= 1  # no empty cluster
    means = np.stack([features[assignments == j].mean(0) for j in range(num_clusters)])
    np.testing.assert_allclose(result.centroids.numpy(), means, rtol=1e-5, atol=1e-5)
    assert result.inertia == pytest.approx(reference_inertia(features, means, assignments), rel=1e-6)


def test_recovers_well_separated_blobs():
    features, labels = separated_blobs()
    result = kmeans(features, 12, seed=0)
    check_partition(result, features, 12)
    assert result.backend == "torch-cpu" and result.device == "cpu" and result.pca_dim is None
    assert 1 <= result.iterations <= 25 and result.seconds > 0
    assert normalized_mutual_info_score(labels, result.assignments.numpy()) > 0.99
    assert adjusted_rand_score(labels, result.assignments.numpy()) > 0.99


@pytest.mark.parametrize("seed", [0, 1])
def test_inertia_matches_scikit_learn_kmeans_plusplus(seed):
    features = relu_mixture(seed=seed)
    ours = kmeans(features, 32, seed=seed, num_iterations=50)
    check_partition(ours, features, 32)
    reference = KMeans(32, init="k-means++", n_init=3, max_iter=50, random_state=seed).fit(features)
    sklearn_inertia = reference_inertia(features, reference.cluster_centers_, reference.labels_)
    assert ours.inertia <= 1.03 * sklearn_inertia


def test_tensor_and_array_inputs_agree_and_are_deterministic():
    features = relu_mixture(n=1500, dim=32, blobs=24)
    first = kmeans(features, 16, seed=3)
    again = kmeans(torch.from_numpy(features).double(), 16, seed=3)  # float64 tensor, converted to float32
    assert torch.equal(first.assignments, again.assignments)
    assert torch.equal(first.centroids, again.centroids)
    assert first.inertia == again.inertia
    other = kmeans(features, 16, seed=4)
    check_partition(other, features, 16)


def test_pca_option_clusters_in_reduced_space_but_returns_original_means():
    features, labels = separated_blobs(dim=32)
    result = kmeans(features, 12, seed=0, pca_dim=4)
    assert result.pca_dim == 4
    check_partition(result, features, 12)  # centroids: (12, 32) means of the original features
    assert normalized_mutual_info_score(labels, result.assignments.numpy()) > 0.99


def test_pca_keeps_quality_on_low_rank_features():
    rng = np.random.default_rng(0)
    features = relu_mixture(n=2000, dim=16, blobs=24) @ rng.standard_normal((16, 128)).astype(np.float32)
    full = kmeans(features, 16, seed=0)
    reduced = kmeans(features, 16, seed=0, pca_dim=16)  # rank 16: the PCA keeps every distance
    check_partition(reduced, features, 16)
    assert reduced.inertia <= 1.02 * full.inertia


def test_torch_backend_on_cpu_matches_faiss_backend():
    features = relu_mixture()
    faiss_result = kmeans(features, 32, seed=0, backend="faiss")
    assert faiss_result.backend == "faiss-cpu" and faiss_result.device == "cpu"
    check_partition(faiss_result, features, 32)
    torch_result = kmeans(features, 32, seed=0, backend="torch")
    assert torch_result.backend == "torch-cpu" and torch_result.device == "cpu"
    check_partition(torch_result, features, 32)
    assert torch_result.inertia == pytest.approx(faiss_result.inertia, rel=0.01)
    again = kmeans(features, 32, seed=0, backend="torch")
    assert torch.equal(torch_result.assignments, again.assignments)


def test_torch_backend_with_pca_and_separated_blobs():
    features, labels = separated_blobs()
    result = kmeans(torch.from_numpy(features), 12, seed=1, backend="torch", pca_dim=8)
    check_partition(result, features, 12)
    assert adjusted_rand_score(labels, result.assignments.numpy()) > 0.99


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_duplicate_points_leave_no_cluster_empty(backend):
    # 3 distinct points for 5 clusters: Lloyd's iterations leave clusters empty, the final step refills them
    features = np.repeat(np.eye(3, 4, dtype=np.float32), [6, 3, 2], axis=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # few points per cluster
        result = kmeans(features, 5, seed=0, backend=backend)
    check_partition(result, features, 5)
    assert result.inertia == pytest.approx(0.0, abs=1e-6)


def test_as_many_points_as_clusters():
    features = np.random.default_rng(0).standard_normal((7, 3)).astype(np.float32)
    with pytest.warns(UserWarning):
        result = kmeans(features, 7)
    check_partition(result, features, 7)
    assert result.inertia == pytest.approx(0.0, abs=1e-6)


def test_fewer_points_than_clusters_names_both_numbers():
    with pytest.raises(ValueError, match=r"got 5 feature rows for num_clusters=8"):
        kmeans(np.ones((5, 3), dtype=np.float32), 8)


@pytest.mark.parametrize("shape", [(10,), (4, 5, 6)])
def test_wrong_number_of_dimensions(shape):
    with pytest.raises(ValueError, match=rf"2-D .*got {len(shape)} dimension\(s\), shape \({shape[0]},"):
        kmeans(np.zeros(shape, dtype=np.float32), 2)


def test_non_finite_features_list_rows():
    features = np.random.default_rng(0).standard_normal((100, 4)).astype(np.float32)
    features[[3, 17, 50], 1] = np.nan
    features[60, 0] = np.inf
    with pytest.raises(ValueError, match=r"NaN or inf in 4 of 100 rows; first rows: 3, 17, 50, 60\."):
        kmeans(features, 2)


def test_non_finite_features_name_sample_ids_and_truncate():
    features = np.random.default_rng(0).standard_normal((100, 4)).astype(np.float32)
    features[20:40] = -np.inf
    sample_ids = np.arange(1000, 1100)
    with pytest.raises(ValueError, match=r"in 20 of 100 rows; first sample ids: 1020, 1021, .*, 1029, \.\.\."):
        kmeans(torch.from_numpy(features), 2, sample_ids=sample_ids)


def test_sample_ids_must_match_rows():
    with pytest.raises(ValueError, match="sample_ids has 3 entries for 10 feature rows"):
        kmeans(np.ones((10, 2), dtype=np.float32), 2, sample_ids=[0, 1, 2])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"pca_dim": 9}, r"pca_dim must be between 1 and .* feature dimension \(8\) and the number of points \(500\)"),
        ({"num_iterations": 0}, "num_iterations must be at least 1"),
        ({"backend": "cuml"}, "backend must be"),
    ],
)
def test_argument_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        kmeans(np.random.default_rng(0).random((500, 8), dtype=np.float32), 4, **kwargs)


def test_few_points_per_cluster_warns_and_enough_does_not():
    features = relu_mixture(n=20 * 16, dim=8, blobs=16)
    with pytest.warns(UserWarning, match=rf"20.0 points per cluster .*at least {MIN_POINTS_PER_CLUSTER}"):
        kmeans(features, 16)
    features = relu_mixture(n=MIN_POINTS_PER_CLUSTER * 16, dim=8, blobs=16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kmeans(features, 16)


def test_logs_the_backend(caplog):
    features, _ = separated_blobs(n=600)
    with caplog.at_level(logging.INFO, logger="ccim_lightning.dictionary.kmeans"):
        kmeans(features, 12)
    assert "backend torch-cpu" in caplog.text and "k-means done" in caplog.text


def test_cuda_request_without_cuda_falls_back_to_cpu_and_says_so(caplog, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a machine without CUDA, also on a GPU machine
    features, _ = separated_blobs(n=600)
    with caplog.at_level(logging.INFO, logger="ccim_lightning.dictionary.kmeans"):
        result = kmeans(features, 12, device="cuda")
    assert result.backend == "torch-cpu" and result.device == "cpu"
    assert "falling back to the CPU" in caplog.text


def test_faiss_backend_on_cuda_needs_faiss_gpu(monkeypatch):
    monkeypatch.delattr(faiss, "StandardGpuResources", raising=False)  # a CPU-only FAISS, also where it has GPUs
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(RuntimeError, match="needs a FAISS build with GPU support"):
        kmeans(np.ones((100, 2), dtype=np.float32), 2, device="cuda:0", backend="faiss")


@pytest.mark.cuda
def test_cuda_device_uses_that_gpu_and_matches_cpu_quality():
    features = relu_mixture()
    cpu = kmeans(features, 32, seed=0)
    index = torch.cuda.device_count() - 1
    gpu = kmeans(torch.from_numpy(features).to(f"cuda:{index}"), 32, seed=0)
    assert gpu.backend in ("faiss-gpu", "torch-gpu") and gpu.device == f"cuda:{index}"
    assert gpu.centroids.device.type == "cpu"
    check_partition(gpu, features, 32)
    assert gpu.inertia == pytest.approx(cpu.inertia, rel=0.03)  # other rounding, possibly another local optimum
    again = kmeans(features, 32, seed=0, device=index)
    assert torch.equal(gpu.assignments, again.assignments)


@pytest.mark.cuda
def test_torch_backend_on_cuda():
    features, labels = separated_blobs()
    result = kmeans(features, 12, seed=0, device="cuda", backend="torch", pca_dim=8)
    assert result.backend == "torch-gpu"
    check_partition(result, features, 12)
    assert adjusted_rand_score(labels, result.assignments.numpy()) > 0.99


# Runs in a child process: before the fix FAISS aborted the whole process (std::terminate, no Python traceback).
_SCALED_RUN = """
import sys
import numpy as np
import torch
from ccim_lightning.dictionary.kmeans import kmeans

torch.set_num_threads(1)
features = np.load(sys.argv[1])
out = {}
for backend, pca in (("faiss", None), ("auto", 4), ("torch", None)):
    for name, scale in (("one", 1.0), ("pow2", 2.0**70), ("tiny", 2.0**-90), ("e30", 1e30)):
        result = kmeans((features.astype(np.float64) * scale).astype(np.float32), 6, backend=backend, pca_dim=pca)
        key = f"{backend}-{pca}-{name}"
        out[key + "-assignments"] = result.assignments.numpy()
        out[key + "-centroids"] = result.centroids.numpy()
        out[key + "-inertia"] = np.float64(result.inertia)
np.savez(sys.argv[2], **out)
"""


def test_features_of_huge_or_tiny_magnitude_cluster_as_unit_features(tmp_path):
    """|x| ~ 1e19 overflows float32 squared distances and |x| ~ 1e-20 underflows them; k-means is scale-invariant."""
    features, labels = separated_blobs(n=600, dim=8, centers=6)
    np.save(tmp_path / "features.npy", features)
    done = subprocess.run(
        [sys.executable, "-c", _SCALED_RUN, str(tmp_path / "features.npy"), str(tmp_path / "out.npz")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, f"k-means crashed (exit {done.returncode}):\n{done.stderr[-3000:]}"
    out = np.load(tmp_path / "out.npz")
    for backend, pca in (("faiss", None), ("auto", 4), ("torch", None)):
        key = f"{backend}-{pca}"
        base = out[f"{key}-one-assignments"]
        assert adjusted_rand_score(labels, base) > 0.99
        for name, scale in (("pow2", 2.0**70), ("tiny", 2.0**-90)):
            # a power of two scales every float exactly: the same partition, centroids scaled exactly
            np.testing.assert_array_equal(out[f"{key}-{name}-assignments"], base)
            expected = out[f"{key}-one-centroids"].astype(np.float64) * scale
            np.testing.assert_allclose(out[f"{key}-{name}-centroids"], expected, rtol=1e-6)
        scaled = features.astype(np.float64) * 1e30
        assignments = out[f"{key}-e30-assignments"]
        assert adjusted_rand_score(labels, assignments) > 0.99
        # inertia recomputed in float64 from the returned centroids (about 1e63 here: far beyond float32)
        assert float(out[f"{key}-e30-inertia"]) == pytest.approx(
            reference_inertia(scaled, out[f"{key}-e30-centroids"], assignments), rel=1e-5
        )


@pytest.mark.parametrize("as_tensor", [True, False])
def test_float64_features_beyond_float32_range_name_the_magnitude(as_tensor):
    features = np.random.default_rng(0).standard_normal((200, 4)) * 1e40
    features[7, 2] = 5e40
    with pytest.raises(ValueError, match=r"magnitude 5e\+40, beyond the float32 range .*normalise .*PCA"):
        kmeans(torch.from_numpy(features) if as_tensor else features, 2)


def test_identical_features_warn_with_the_distinct_count(caplog):
    with caplog.at_level(logging.WARNING, logger="ccim_lightning.dictionary.kmeans"):
        kmeans(np.full((400, 6), 0.25, dtype=np.float32), 4)
    assert "all 400 feature rows are identical" in caplog.text
    assert "lower num_clusters to at most 1" in caplog.text


def test_fewer_distinct_points_than_clusters_warn_and_enough_do_not(caplog):
    features = np.repeat(np.eye(3, 4, dtype=np.float32), [150, 100, 50], axis=0)
    with caplog.at_level(logging.WARNING, logger="ccim_lightning.dictionary.kmeans"), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # few points per cluster
        kmeans(features, 5)
        assert "only 3 of 300 rows are distinct, fewer than the 5 clusters" in caplog.text
        caplog.clear()
        kmeans(features, 3)
    assert "distinct" not in caplog.text


def test_empty_cluster_moves_by_hand():
    # sizes: cluster 0 has 3 points, 1 has 1 (a singleton, never emptied), 2 and 3 are empty.
    # Candidates farthest first: point 7 (the singleton's) is passed over, points 4 and 5 (cluster 0) move.
    candidates = [(7, 1), (4, 0), (5, 0), (6, 0)]
    assert empty_cluster_moves([2, 3], [3, 1, 0, 0], candidates) == [(4, 2), (5, 3)]
    # cluster 0 is down to 1 member after one move, so point 5 stays and nothing is left for cluster 3
    with pytest.raises(ValueError, match="empty cluster 3"):
        empty_cluster_moves([2, 3], [2, 1, 0, 0], [(4, 0), (5, 0), (7, 1)])
    assert empty_cluster_moves([], [3, 1], candidates) == []
