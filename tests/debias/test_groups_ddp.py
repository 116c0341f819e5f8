"""Coarse pseudo-groups under torch.distributed (gloo, two CPU processes): every rank gets one process's table."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ccim_lightning.debias.groups import PseudoGroups
from tests.distributed import free_port


def planted():
    generator = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    prototypes = torch.cat([c + 0.3 * torch.randn(5, 2, generator=generator) for c in centres])  # 20 prototypes
    clusters = torch.randint(0, 20, (200,), generator=generator)
    targets = torch.randint(0, 3, (200,), generator=generator)
    return prototypes, clusters, targets


def fitted_table():
    groups = PseudoGroups("coarse")
    groups.bind(num_clusters=20, num_classes=3)
    groups.fit(*planted())
    return groups.table


def run_rank(rank, port, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.save(fitted_table(), f"{out}/table{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.ddp
def test_coarse_table_is_the_same_on_every_rank_and_as_one_process(tmp_path):
    mp.start_processes(run_rank, args=(free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    table0, table1 = torch.load(tmp_path / "table0.pt"), torch.load(tmp_path / "table1.pt")
    single = fitted_table()
    assert torch.equal(table0, table1) and torch.equal(table0, single)
    # Four blobs of prototypes: every class (which uses all of them) has four coarse groups.
    assert all(len(single[:, y].unique()) == 4 for y in range(3))
