"""distributed_kmeans and all_gather_variable: one process and two gloo ranks on the CPU, against references.

References written out here: the nearest centroid by brute-force ``torch.cdist``, member means and inertia from
their definitions in float64, and the one-process FAISS ``kmeans`` of the same data (inertia within 0.5%).
"""

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ccim_lightning.dictionary import kmeans as one_process
from ccim_lightning.dictionary.distributed import (
    _Collectives,
    _fill_empty_clusters,
    _greedy_kmeans_plusplus,
    _seed_centres,
    _Shard,
    all_gather_variable,
    distributed_kmeans,
)
from ccim_lightning.dictionary.kmeans import kmeans
from ccim_lightning.dictionary.refill import fill_empty_clusters

TOLERANCE = 0.005  # inertia relative to the one-process build
CASES = {  # name: (rows, dim, blobs, k, shard sizes of the two ranks)
    "700-300": (1000, 16, 12, 12, (700, 300)),
    "fewer-rows-than-k": (1000, 16, 16, 16, (990, 10)),
    "empty-rank": (600, 8, 6, 6, (600, 0)),
    "small-pool": (50, 4, 5, 12, (20, 30)),  # n <= 5k + 1: greedy k-means++ on all points
}


def blobs(rows: int, dim: int, centres: int, seed: int, labels: bool = False):
    """Gaussian blobs (unit noise around 20 + N(0, 4^2) centres, uneven sizes), float32 (and the blob of each row).

    The common offset of 20, like the large mean of ReLU features, makes a centring mistake visible.
    """
    generator = torch.Generator().manual_seed(seed)
    means = 20.0 + 4.0 * torch.randn(centres, dim, generator=generator)
    shares = torch.rand(centres, generator=generator) + 0.5
    blob = torch.multinomial(shares, rows, replacement=True, generator=generator)
    x = means[blob] + torch.randn(rows, dim, generator=generator)
    return (x, blob) if labels else x


def shard_of(x: torch.Tensor, start: int, stop: int) -> _Shard:
    """Rows start:stop of x as one rank's shard (centred on the mean of all of x)."""
    return _Shard(x[start:stop], x.double().mean(0), start, len(x))


def random_fill_case(seed: int = 0, rows: int = 1000, k: int = 20):
    """Assignments with three empty clusters and a singleton, and distances with ties, for the refill."""
    generator = torch.Generator().manual_seed(seed)
    assignments = torch.randint(3, k, (rows,), generator=generator)  # clusters 0, 1, 2 empty
    assignments[assignments == 3] = 4
    assignments[17] = 3  # a singleton: must not be emptied
    distances = torch.rand(rows, generator=generator).round(decimals=2)  # ties, broken by row
    distances[17] = 5.0  # the farthest point of all, but alone in its cluster
    return assignments, distances, k


def check_partition(x: torch.Tensor, centroids: torch.Tensor, counts: torch.Tensor, assignments, inertia) -> None:
    """The result describes one partition: nearest centroids, member means, sizes and inertia by definition."""
    x64, k = x.double(), centroids.shape[0]
    distances = torch.cdist(x64, centroids.double()).square()
    nearest = distances.min(1).values
    assert torch.allclose(distances[torch.arange(len(x)), assignments], nearest, rtol=1e-5, atol=1e-4)
    assert torch.equal(counts, torch.bincount(assignments, minlength=k))
    assert bool((counts > 0).all()) and int(counts.sum()) == len(x)
    means = torch.zeros(k, x.shape[1], dtype=torch.float64).index_add_(0, assignments, x64) / counts[:, None]
    assert torch.allclose(centroids.double(), means, rtol=1e-5, atol=1e-5)
    expected = float((x64 - centroids.double()[assignments]).square().sum())
    assert inertia == pytest.approx(expected, rel=1e-6)


# --- one process, no process group ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_single_process_matches_kmeans_and_is_a_consistent_partition(name):
    rows, dim, centres, k, _ = CASES[name]
    x = blobs(rows, dim, centres, seed=1)
    result = distributed_kmeans(x, k, seed=0, num_iterations=25)
    assert (result.world_size, result.rank, result.num_points) == (1, 0, rows)
    assert result.centroids.shape == (k, dim) and result.assignments.shape == (rows,)
    check_partition(x, result.centroids, result.counts, result.assignments, result.inertia)
    reference = kmeans(x, k, seed=0, num_iterations=25)
    assert result.inertia <= reference.inertia * (1 + TOLERANCE)
    assert result.inertia >= reference.inertia * (1 - TOLERANCE)


def test_same_seed_same_result_and_other_seeds_differ_in_draws():
    x = blobs(3000, 16, 40, seed=2)
    first = distributed_kmeans(x, 32, seed=5, num_iterations=5)
    again = distributed_kmeans(x, 32, seed=5, num_iterations=5)
    other = distributed_kmeans(x, 32, seed=6, num_iterations=5)
    assert torch.equal(first.centroids, again.centroids) and torch.equal(first.assignments, again.assignments)
    assert not torch.equal(first.centroids, other.centroids)


def test_empty_clusters_are_filled_from_duplicated_points():
    # Three distinct points repeated: seeds coincide, Lloyd leaves clusters empty, the farthest points refill them.
    x = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]]).repeat(10, 1)
    result = distributed_kmeans(x, 5, seed=0, num_iterations=5)
    check_partition(x, result.centroids, result.counts, result.assignments, result.inertia)
    assert result.inertia == pytest.approx(0.0, abs=1e-6)


def test_seeds_are_distinct_data_points_one_per_separated_blob():
    x, blob = blobs(2000, 16, 10, seed=4, labels=True)
    shard = shard_of(x, 0, len(x))
    seeds = _seed_centres(shard, 10, seed=0, comm=_Collectives(None, x.device)).double() + shard.mean64
    distances, rows = torch.cdist(seeds, x.double()).min(1)
    assert float(distances.max()) < 1e-3  # every seed is one of the points, in the original coordinates
    assert len(set(blob[rows].tolist())) == 10  # k-means++ spreads them over the (well separated) blobs


def test_row_wise_greedy_seeding_chooses_as_the_one_process_greedy():
    points = blobs(300, 8, 10, seed=5)
    weights = torch.randint(1, 20, (300,), generator=torch.Generator().manual_seed(0)).double()
    ours = _greedy_kmeans_plusplus(points, weights, 20, torch.Generator().manual_seed(3))
    theirs = one_process._greedy_kmeans_plusplus(points, weights, 20, torch.Generator().manual_seed(3))
    assert torch.equal(ours, theirs)


def test_empty_cluster_refill_equals_the_one_process_refill():
    assignments, distances, k = random_fill_case()
    x = torch.zeros(len(assignments), 2)
    expected = fill_empty_clusters(assignments, distances, k)
    filled = _fill_empty_clusters(shard_of(x, 0, len(x)), assignments, distances, k, _Collectives(None, x.device))
    assert torch.equal(filled, expected)
    assert int(filled[17]) == 3 and bool((torch.bincount(filled, minlength=k) > 0).all())


def test_input_is_read_not_modified_and_other_dtypes_are_accepted():
    x = blobs(400, 8, 4, seed=3).double()
    copy = x.clone()
    result = distributed_kmeans(x, 4, seed=0)
    assert torch.equal(x, copy)
    assert result.centroids.dtype == torch.float32
    check_partition(x, result.centroids, result.counts, result.assignments, result.inertia)


def test_bad_input_is_a_clear_error():
    x = blobs(100, 4, 2, seed=0)
    x[7, 2] = float("nan")
    with pytest.raises(ValueError, match="rank 0: 1 row\\(s\\), first local row 7"):
        distributed_kmeans(x, 4)
    with pytest.raises(ValueError, match="exceeds the number of points"):
        distributed_kmeans(torch.zeros(3, 2), 4)
    with pytest.raises(ValueError, match="2-D"):
        distributed_kmeans(torch.zeros(10), 2)
    with pytest.raises(ValueError, match="num_clusters"):
        distributed_kmeans(torch.zeros(10, 2), 0)


def test_all_gather_variable_without_a_process_group_returns_the_tensor():
    tensor = torch.arange(6).reshape(3, 2)
    assert torch.equal(all_gather_variable(tensor), tensor)


# --- two gloo ranks ------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _job(rank: int, world_size: int, port: int, out: str) -> None:
    """One rank: every case on its shard, the repeat, all_gather_variable, and an error raised on one rank only."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    results = {}
    for name, (rows, dim, centres, k, sizes) in CASES.items():
        x = blobs(rows, dim, centres, seed=1)
        start = sum(sizes[:rank])
        shard = x[start : start + sizes[rank]]
        result = distributed_kmeans(shard, k, seed=0, num_iterations=25)
        repeat = distributed_kmeans(shard, k, seed=0, num_iterations=25)
        results[name] = {
            "centroids": result.centroids,
            "counts": result.counts,
            "inertia": result.inertia,
            "world_size": result.world_size,
            "local": result.assignments,
            "gathered": all_gather_variable(result.assignments),
            "repeat_equal": torch.equal(repeat.centroids, result.centroids)
            and torch.equal(repeat.assignments, result.assignments),
        }
    x = blobs(*CASES["700-300"][:3], seed=1)
    shard = shard_of(x, *((0, 700), (700, 1000))[rank])
    results["seeds"] = _seed_centres(shard, 12, seed=0, comm=_Collectives(None, x.device))
    assignments, distances, k = random_fill_case()
    start, stop = ((0, 700), (700, 1000))[rank]
    local = _fill_empty_clusters(shard, assignments[start:stop], distances[start:stop], k, _Collectives(None, x.device))
    results["filled"] = all_gather_variable(local)
    pairs = torch.stack([torch.arange(rank + 2), torch.full((rank + 2,), 10 * rank)], 1)
    results["pairs"] = all_gather_variable(pairs)
    results["flags"] = all_gather_variable(torch.tensor([True, False][: rank + 1]))
    bad = torch.zeros(50, 3)
    if rank == 1:
        bad[4, 0] = float("inf")
    try:
        distributed_kmeans(bad, 2)
    except ValueError as error:
        results["error"] = str(error)
    torch.save(results, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp_kmeans")
    mp.spawn(_job, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{rank}.pt") for rank in (0, 1)]


@pytest.mark.slow
@pytest.mark.ddp
@pytest.mark.parametrize("name", list(CASES))
def test_two_ranks_equal_one_process_within_tolerance(two_ranks, name):
    rows, dim, centres, k, sizes = CASES[name]
    x = blobs(rows, dim, centres, seed=1)
    rank0, rank1 = two_ranks[0][name], two_ranks[1][name]
    assert rank0["world_size"] == rank1["world_size"] == 2
    assert torch.equal(rank0["centroids"], rank1["centroids"]) and torch.equal(rank0["counts"], rank1["counts"])
    assert rank0["inertia"] == rank1["inertia"]
    assert [len(rank0["local"]), len(rank1["local"])] == list(sizes)
    assignments = torch.cat([rank0["local"], rank1["local"]])
    assert torch.equal(rank0["gathered"], assignments) and torch.equal(rank1["gathered"], assignments)
    check_partition(x, rank0["centroids"], rank0["counts"], assignments, rank0["inertia"])
    one_process = kmeans(x, k, seed=0, num_iterations=25)
    assert abs(rank0["inertia"] / one_process.inertia - 1) <= TOLERANCE
    # The draws follow global row numbers, so one rank on the concatenated shards finds the same partition.
    single = distributed_kmeans(x, k, seed=0, num_iterations=25)
    assert rank0["inertia"] == pytest.approx(single.inertia, rel=1e-6)
    assert rank0["repeat_equal"] and rank1["repeat_equal"]


@pytest.mark.slow
@pytest.mark.ddp
def test_two_ranks_seed_and_refill_as_one_process(two_ranks):
    x = blobs(*CASES["700-300"][:3], seed=1)
    seeds = _seed_centres(shard_of(x, 0, len(x)), 12, seed=0, comm=_Collectives(None, x.device))
    assignments, distances, k = random_fill_case()
    expected = fill_empty_clusters(assignments, distances, k)
    for results in two_ranks:
        assert torch.allclose(results["seeds"], seeds, atol=1e-5)
        assert torch.equal(results["filled"], expected)


@pytest.mark.slow
@pytest.mark.ddp
def test_two_ranks_all_gather_variable_and_errors_on_every_rank(two_ranks):
    expected_pairs = torch.tensor([[0, 0], [1, 0], [0, 10], [1, 10], [2, 10]])
    expected_flags = torch.tensor([True, True, False])
    for results in two_ranks:
        assert torch.equal(results["pairs"], expected_pairs)
        assert torch.equal(results["flags"], expected_flags)
        assert "rank 1: 1 row(s), first local row 4" in results["error"]
