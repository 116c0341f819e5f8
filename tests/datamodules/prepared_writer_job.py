"""Two gloo processes, each the writer of its own node (``prepare_data_per_node``) on one shared prepared folder.

Usage: ``python prepared_writer_job.py PHOTO_ROOT PREPARED_DIR``. Both ranks start writing at the same moment (a
barrier), then each reads its shard of the training split (``DistributedSampler``) without building anything and
writes ``rank<r>.ok`` (the split's size) beside the folder.
"""

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DistributedSampler

from ccim_lightning.datamodules.table import TableDataModule


def run(rank: int, photo_root: str, prepared_dir: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        dm = TableDataModule(photo_root, "table.csv", ["a", "b"], context_size=(48, 64), subject_size=32,
                             num_workers=0, prepared_dir=prepared_dir)  # fmt: skip
        dist.barrier()
        dm.prepare_data()  # both at once, as two nodes' writers would
        dist.barrier()
        train = dm.prepared_split("train", build=False)
        shard = list(DistributedSampler(train, num_replicas=2, rank=rank, shuffle=False))
        samples = [train[i] for i in shard]
        assert all(sample is not None for sample in samples)
        gathered = [None, None]
        dist.all_gather_object(gathered, shard)
        assert sorted(set(gathered[0]) | set(gathered[1])) == list(range(len(train)))
        (Path(prepared_dir).parent / f"rank{rank}.ok").write_text(str(len(train)))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    port = 29500 + os.getpid() % 1000
    mp.spawn(run, args=(sys.argv[1], sys.argv[2], port), nprocs=2, join=True)
