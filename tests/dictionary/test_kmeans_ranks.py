"""kmeans() at world size 1, 2 and 4 (gloo ranks on the CPU): the same seed gives the same dictionary.

References written out here: the nearest centroid by brute-force ``torch.cdist``, member means and inertia from their
definitions in float64, and the one-process result of the same rows, whatever their split over ranks.
"""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ccim_lightning.dictionary.kmeans import kmeans
from tests.distributed import free_port

CASES = {  # name: (rows, dim, blobs, k, how the rows are dealt to the ranks)
    "interleaved": (1000, 16, 12, 12, "interleaved"),
    "uneven-blocks": (1000, 16, 16, 16, "uneven"),
    "empty-rank": (600, 8, 6, 6, "empty"),
    "small-pool": (50, 4, 5, 12, "interleaved"),  # n <= 5k + 1: greedy k-means++ on all points
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


def rows_of_rank(rows: int, how: str, world_size: int, rank: int) -> torch.Tensor:
    """The sample ids rank ``rank`` holds, shuffled: no split keeps the rows' order or positions."""
    ids = torch.randperm(rows, generator=torch.Generator().manual_seed(7))
    if how == "interleaved":
        return ids[rank::world_size]
    if how == "empty" and rank == world_size - 1:
        return ids[:0]
    ranks = world_size - (how == "empty")
    bounds = [0, *sorted(torch.randint(rows, (ranks - 1,), generator=torch.Generator().manual_seed(3)).tolist()), rows]
    return ids[bounds[rank] : bounds[rank + 1]] if rank < ranks else ids[:0]


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


def one_process(name: str):
    rows, dim, centres, k, _ = CASES[name]
    x = blobs(rows, dim, centres, seed=1)
    return x, kmeans(x, k, seed=0, sample_ids=torch.arange(rows))


# --- one process ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_one_process_is_a_consistent_partition(name):
    x, result = one_process(name)
    assert result.world_size == 1 and result.assignments.shape == (len(x),)
    check_partition(x, result.centroids, result.counts, result.assignments, result.inertia)


def test_draws_follow_sample_ids_not_row_positions():
    x = blobs(1000, 16, 12, seed=1)
    order = torch.randperm(1000, generator=torch.Generator().manual_seed(0))
    straight = kmeans(x, 12, seed=0, sample_ids=torch.arange(1000))
    shuffled = kmeans(x[order], 12, seed=0, sample_ids=order)
    assert torch.allclose(shuffled.centroids, straight.centroids, atol=1e-5)
    assert torch.equal(shuffled.counts, straight.counts)
    assert torch.equal(shuffled.assignments, straight.assignments[order])


def test_same_seed_same_result_and_other_seeds_differ_in_draws():
    x = blobs(3000, 16, 40, seed=2)
    first = kmeans(x, 32, seed=5, num_iterations=5)
    again = kmeans(x, 32, seed=5, num_iterations=5)
    other = kmeans(x, 32, seed=6, num_iterations=5)
    assert torch.equal(first.centroids, again.centroids) and torch.equal(first.assignments, again.assignments)
    assert not torch.equal(first.centroids, other.centroids)


def test_seeds_spread_over_separated_blobs():
    x, blob = blobs(2000, 16, 10, seed=4, labels=True)
    result = kmeans(x, 10, seed=0, num_iterations=1)
    # one Lloyd step from k-means++ seeds on well separated blobs: each cluster is one blob
    assert len({tuple(blob[result.assignments == j].unique().tolist()) for j in range(10)}) == 10
    assert all(len(blob[result.assignments == j].unique()) == 1 for j in range(10))


def test_input_is_read_not_modified_and_other_dtypes_are_accepted():
    x = blobs(400, 8, 4, seed=3).double()
    copy = x.clone()
    result = kmeans(x, 4, seed=0)
    assert torch.equal(x, copy)
    assert result.centroids.dtype == torch.float32
    check_partition(x, result.centroids, result.counts, result.assignments, result.inertia)


# --- 2 and 4 gloo ranks --------------------------------------------------------------------------------------------


def _job(rank: int, world_size: int, port: int, out: str) -> None:
    """One rank: every case on its share of the rows, PCA, and an error raised where only rank 1 has a bad row."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    results = {}
    for name, (rows, dim, centres, k, how) in CASES.items():
        x = blobs(rows, dim, centres, seed=1)
        ids = rows_of_rank(rows, how, world_size, rank)
        result = kmeans(x[ids], k, seed=0, sample_ids=ids)
        results[name] = {"ids": ids, "result": result}
    x = blobs(1000, 16, 12, seed=1)
    ids = rows_of_rank(1000, "interleaved", world_size, rank)
    results["pca"] = {"ids": ids, "result": kmeans(x[ids], 12, seed=0, pca_dim=6, sample_ids=ids)}
    bad = torch.zeros(50, 3)
    if rank == 1:
        bad[4, 0] = float("inf")
    try:
        kmeans(bad, 2, sample_ids=torch.arange(50) + 100 * rank)
    except ValueError as error:
        results["error"] = str(error)
    torch.save(results, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def run_ranks(tmp_path_factory, world_size: int) -> list[dict]:
    out = tmp_path_factory.mktemp(f"kmeans_{world_size}_ranks")
    mp.spawn(_job, args=(world_size, free_port(), str(out)), nprocs=world_size, join=True)
    return [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(world_size)]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return run_ranks(tmp_path_factory, 2)


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory):
    return run_ranks(tmp_path_factory, 4)


def check_same_as_one_process(ranks: list[dict], name: str, single) -> None:
    """Every rank holds the one-process centroids and counts; the ranks' assignments are its assignments by id."""
    for results in ranks:
        result = results[name]["result"]
        assert result.world_size == len(ranks)
        assert torch.allclose(result.centroids, single.centroids, rtol=1e-5, atol=1e-5)
        assert torch.equal(result.counts, single.counts)
        assert result.inertia == pytest.approx(single.inertia, rel=1e-6)
        assert torch.equal(result.assignments, single.assignments[results[name]["ids"]])
    assert sorted(torch.cat([r[name]["ids"] for r in ranks]).tolist()) == list(range(len(single.assignments)))


@pytest.mark.slow
@pytest.mark.ddp
@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("name", list(CASES))
def test_ranks_give_the_one_process_dictionary(request, world_size, name):
    ranks = request.getfixturevalue({2: "two_ranks", 4: "four_ranks"}[world_size])
    x, single = one_process(name)
    check_same_as_one_process(ranks, name, single)
    check_partition(x, single.centroids, single.counts, single.assignments, single.inertia)


@pytest.mark.slow
@pytest.mark.ddp
def test_ranks_with_pca_give_the_one_process_dictionary(two_ranks, four_ranks):
    x = blobs(1000, 16, 12, seed=1)
    single = kmeans(x, 12, seed=0, pca_dim=6, sample_ids=torch.arange(1000))
    check_partition(x, single.centroids, single.counts, single.assignments, single.inertia)
    check_same_as_one_process(two_ranks, "pca", single)
    check_same_as_one_process(four_ranks, "pca", single)


@pytest.mark.slow
@pytest.mark.ddp
def test_bad_rows_on_one_rank_are_the_same_error_on_every_rank(two_ranks):
    for results in two_ranks:
        assert "NaN or inf in 1 of 100 rows; first sample ids: 104." in results["error"]
