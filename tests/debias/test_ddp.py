"""Group DRO under torch.distributed (gloo, two CPU processes): every rank ends with the same group weights q."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from ccim_lightning.debias import GroupDRO
from tests.distributed import free_port

CE = nn.CrossEntropyLoss(reduction="none")


def make_batches():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 8, 2, generator=generator)  # rank, step, sample, class
    targets = torch.randint(0, 2, (2, 3, 8), generator=generator)
    clusters = torch.randint(0, 3, (2, 3, 8), generator=generator)
    return logits, targets, clusters


def bound():
    method = GroupDRO(eta=0.5)
    method.bind(num_classes=2, task="multiclass", num_clusters=3)
    return method


def run_rank(rank, port, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        method = bound()
        logits, targets, clusters = make_batches()
        for step in range(3):
            method.training_loss(logits[rank, step], {"target": targets[rank, step]}, clusters[rank, step], CE)
        torch.save(method.q, f"{out}/q{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.ddp
def test_group_dro_q_is_in_sync_across_ranks_and_equals_one_process_on_the_global_batch(tmp_path):
    mp.start_processes(run_rank, args=(free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    q0, q1 = torch.load(tmp_path / "q0.pt"), torch.load(tmp_path / "q1.pt")
    assert torch.equal(q0, q1)

    single = bound()
    logits, targets, clusters = make_batches()
    for step in range(3):  # the two ranks' batches together
        single.training_loss(
            logits[:, step].reshape(16, 2), {"target": targets[:, step].reshape(16)}, clusters[:, step].reshape(16), CE
        )
    torch.testing.assert_close(q0, single.q)
    assert not torch.allclose(single.q, torch.full((6,), 1 / 6))
