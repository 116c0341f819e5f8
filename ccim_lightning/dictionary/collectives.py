"""The process-group operations the dictionary build needs, written once; each is the identity in one process.

:class:`Collectives` wraps ``torch.distributed``'s default group (or none): sums, gathers of equal and unequal
tensors, broadcasts of any picklable object, and :meth:`Collectives.agreed`, which makes a failure on one rank end
every rank at once instead of leaving the healthy ones blocked in their next collective until the process-group
timeout. Tensors travel on the device the backend needs (the CPU for gloo, CUDA for NCCL) and come back on their
own device.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["Collectives", "RankFailedError"]


class RankFailedError(RuntimeError):
    """Another rank failed during a step of the dictionary build; its own log holds the cause."""


class Collectives:
    """One process group (or a single process) and the collectives the dictionary build uses.

    Args:
        group: A ``torch.distributed`` process group; ``None`` = the default group when one is initialised.
        device: Where this rank computes; default: its current CUDA device under NCCL, else the CPU.

    Attributes:
        world_size: Number of ranks (1 without a process group).
        rank: This rank within the group.
        is_global_zero: Whether this is rank 0.
        device: Where this rank computes.
    """

    def __init__(self, group: dist.ProcessGroup | None = None, device: torch.device | str | None = None) -> None:
        active = dist.is_available() and dist.is_initialized()
        if group is not None and not active:
            raise ValueError("A process group was given but torch.distributed is not initialised")
        self.group = group
        self.world_size = dist.get_world_size(group) if active else 1
        self.rank = dist.get_rank(group) if active else 0
        self.is_global_zero = self.rank == 0
        backend = str(dist.get_backend(group)) if active else ""
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        self.device = torch.device(device)
        if backend == "gloo":
            self._wire = torch.device("cpu")
        elif backend == "nccl":
            self._wire = (
                self.device if self.device.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
            )
        else:  # one process, or a multi-device backend such as "cpu:gloo,cuda:nccl" that takes tensors where they are
            self._wire = self.device

    @classmethod
    def current(cls, device: torch.device | str | None = None) -> Collectives:
        """The default process group when ``torch.distributed`` is initialised, else one process."""
        return cls(None, device)

    def __repr__(self) -> str:
        return f"Collectives(world_size={self.world_size}, rank={self.rank}, device={self.device})"

    def _global(self, rank: int) -> int:
        return rank if self.group is None else dist.get_global_rank(self.group, rank)

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """The element-wise sum over ranks, as a new tensor on the device of ``tensor``."""
        if self.world_size == 1:
            return tensor.clone()
        moved = tensor.to(self._wire, copy=True)
        dist.all_reduce(moved, group=self.group)
        return moved.to(tensor.device)

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """(world_size, *shape): every rank's ``tensor`` (the same shape and dtype on every rank), in rank order."""
        if self.world_size == 1:
            return tensor.unsqueeze(0).clone()
        wire = tensor.to(torch.uint8) if tensor.dtype == torch.bool else tensor  # NCCL has no bool
        moved = wire.to(self._wire).contiguous()
        parts = [torch.empty_like(moved) for _ in range(self.world_size)]
        dist.all_gather(parts, moved, group=self.group)
        return torch.stack(parts).to(device=tensor.device, dtype=tensor.dtype)

    def gather_unequal(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's rows concatenated in rank order; first dimensions may differ, down to zero rows.

        Each rank pads its rows to the longest shard for one ``all_gather``; the padding is cut off again.

        Raises:
            ValueError: On every rank, when the ranks' tensors differ in more than their first dimension or in dtype.
        """
        if self.world_size == 1:
            return tensor.clone()
        if tensor.ndim == 0:
            raise ValueError("gather_unequal needs tensors with a first (row) dimension; got a 0-dim tensor")
        header = [tensor.shape[0], tensor.ndim, _DTYPES.index(tensor.dtype) if tensor.dtype in _DTYPES else -1]
        shape = [*header, *tensor.shape[1:]][:16]
        table = self.all_gather(torch.tensor(shape + [-1] * (16 - len(shape)), dtype=torch.int64)).tolist()
        if any(row[1:] != table[0][1:] for row in table):
            described = "; ".join(
                f"rank {r}: shape {tuple(row[3 : 2 + row[1]])} after the rows, dtype "
                f"{_DTYPES[row[2]] if row[2] >= 0 else 'other'}"
                for r, row in enumerate(table)
            )
            raise ValueError(f"gather_unequal needs tensors that differ only in their number of rows; got {described}")
        sizes = [row[0] for row in table]
        padded = tensor.new_zeros((max(sizes), *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        gathered = self.all_gather(padded)
        return torch.cat([gathered[r, :size] for r, size in enumerate(sizes)])

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        """Rank ``src``'s ``obj`` (anything picklable) on every rank; the object itself in one process."""
        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=self._global(src), group=self.group, device=self._wire)
        return box[0]

    @contextmanager
    def agreed(self, step: str) -> Iterator[None]:
        """Runs a step, then has all ranks agree it succeeded everywhere before any of them goes on.

        An exception on one rank is re-raised there after the agreement; the other ranks raise
        :class:`RankFailedError` naming ``step``. In one process the step simply runs.
        """
        if self.world_size == 1:
            yield
            return
        error: BaseException | None = None
        try:
            yield
        except Exception as exc:  # re-raised below, once every rank knows
            error = exc
        failures = int(self.all_reduce(torch.tensor([int(error is not None)], device=self._wire))[0])
        if error is not None:
            raise error
        if failures:
            raise RankFailedError(
                f"Confounder dictionary: another rank failed while {step}; this rank (rank {self.rank}) stops too. "
                "The failing rank's log has the cause."
            )


_DTYPES = [
    getattr(torch, name) for name in "float16 bfloat16 float32 float64 uint8 int8 int16 int32 int64 bool".split()
]
"""Dtypes :meth:`Collectives.gather_unequal` names by position when it checks that the ranks agree."""
