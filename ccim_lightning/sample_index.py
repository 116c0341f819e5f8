"""One row per sample: the rule every gatherer of per-sample rows (features, predictions, targets) shares.

A ``DistributedSampler`` pads the last shard with repeats, and a loader may yield a sample twice; rows carry the
sample's ``index`` (its position in the split), so the repeats are dropped by it, keeping the first.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["first_of_each_index"]


def first_of_each_index(index: torch.Tensor | np.ndarray) -> np.ndarray:
    """Positions of the first row of each distinct sample index, ordered by that index.

    Args:
        index: (M,) sample indices of M rows, repeats allowed (a tensor on any device, or an array).

    Returns:
        (K,) int64 row positions, one per distinct index, so that ``index[positions]`` is sorted and repeat-free.
    """
    values = index.detach().cpu().numpy() if isinstance(index, torch.Tensor) else np.asarray(index)
    if values.ndim != 1:
        raise ValueError(f"Sample indices must be one-dimensional, got shape {list(values.shape)}.")
    # np.unique sorts stably when asked for positions, so each returned position is the index's first row.
    _, first = np.unique(values, return_index=True)
    return first.astype(np.int64)
