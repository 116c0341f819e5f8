"""Collectives: the identity in one process, and on two gloo ranks the results written out by hand."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ccim_lightning.dictionary.collectives import Collectives, RankFailedError
from tests.distributed import free_port


def test_one_process_every_method_is_the_identity():
    group = Collectives.current()
    assert (group.world_size, group.rank, group.is_global_zero, group.device) == (1, 0, True, torch.device("cpu"))
    tensor = torch.arange(6.0).reshape(3, 2)
    assert torch.equal(group.all_reduce(tensor), tensor)
    assert torch.equal(group.all_gather(tensor), tensor.unsqueeze(0))
    assert torch.equal(group.gather_unequal(tensor), tensor)
    assert torch.equal(group.gather_unequal(torch.zeros(0, 2)), torch.zeros(0, 2))
    payload = {"a": [1, 2]}
    assert group.broadcast(payload) is payload
    with group.agreed("a step"):
        pass
    with pytest.raises(KeyError), group.agreed("a failing step"):
        raise KeyError("boom")


def _job(rank: int, world_size: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    group = Collectives.current()
    results = {"identity": (group.world_size, group.rank, group.is_global_zero)}
    results["sum"] = group.all_reduce(torch.tensor([1.0, 10.0 * (rank + 1)]))
    results["gather"] = group.all_gather(torch.tensor([rank, -rank]))
    results["flags"] = group.all_gather(torch.tensor([rank == 0]))
    results["pairs"] = group.gather_unequal(
        torch.stack([torch.arange(rank + 2), torch.full((rank + 2,), 10 * rank)], 1)
    )
    results["empty"] = group.gather_unequal(torch.zeros((0, 3)) if rank == 0 else torch.ones((2, 3)))
    results["bools"] = group.gather_unequal(torch.tensor([True, False][: rank + 1]))
    results["object"] = group.broadcast({"from": rank, "tensor": torch.tensor([rank])}, src=1)
    try:
        group.gather_unequal(torch.zeros(2, 3 + rank))
    except ValueError as error:
        results["shape_error"] = str(error)
    try:
        with group.agreed("testing the agreement"):
            if rank == 1:
                raise KeyError("rank 1's own failure")
    except (KeyError, RankFailedError) as error:
        results["agreed"] = (type(error).__name__, str(error))
    with group.agreed("a step that succeeds"):
        results["after"] = True
    torch.save(results, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("collectives")
    mp.spawn(_job, args=(2, free_port(), str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{rank}.pt") for rank in (0, 1)]


@pytest.mark.slow
@pytest.mark.ddp
def test_two_ranks_collectives_by_hand(two_ranks):
    for rank, results in enumerate(two_ranks):
        assert results["identity"] == (2, rank, rank == 0)
        assert torch.equal(results["sum"], torch.tensor([2.0, 30.0]))
        assert torch.equal(results["gather"], torch.tensor([[0, 0], [1, -1]]))
        assert torch.equal(results["flags"], torch.tensor([[True], [False]]))
        assert torch.equal(results["pairs"], torch.tensor([[0, 0], [1, 0], [0, 10], [1, 10], [2, 10]]))
        assert torch.equal(results["empty"], torch.ones(2, 3))
        assert torch.equal(results["bools"], torch.tensor([True, True, False]))
        assert results["object"]["from"] == 1 and torch.equal(results["object"]["tensor"], torch.tensor([1]))
        assert "rank 0: shape (3,)" in results["shape_error"] and "rank 1: shape (4,)" in results["shape_error"]
        assert results["after"]
    assert two_ranks[0]["agreed"][0] == "RankFailedError" and "testing the agreement" in two_ranks[0]["agreed"][1]
    assert two_ranks[1]["agreed"] == ("KeyError", '"rank 1\'s own failure"')
