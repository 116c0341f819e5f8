import numpy as np
import pytest
import torch

from ccim_lightning.sample_index import first_of_each_index


def test_first_row_of_each_index_in_index_order():
    index = [4, 1, 4, 0, 1, 3]
    # By hand: index 0 first at row 3, 1 at row 1, 3 at row 5, 4 at row 0.
    assert first_of_each_index(np.array(index)).tolist() == [3, 1, 5, 0]
    assert first_of_each_index(torch.tensor(index)).tolist() == [3, 1, 5, 0]
    # Reference: a loop keeping the first position of each value.
    rng = np.random.default_rng(0)
    many = rng.integers(0, 50, size=400)
    first: dict[int, int] = {}
    for row, value in enumerate(many.tolist()):
        first.setdefault(value, row)
    assert first_of_each_index(many).tolist() == [first[v] for v in sorted(first)]
    assert first_of_each_index(np.zeros(0, dtype=np.int64)).tolist() == []


def test_indices_must_be_one_dimensional():
    with pytest.raises(ValueError, match=r"one-dimensional, got shape \[2, 2\]"):
        first_of_each_index(np.zeros((2, 2)))
