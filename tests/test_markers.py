"""tests/conftest.py: the markers of setup.cfg registered once, strict and acted on (ddp implies slow, cuda skips); one
OpenMP thread for the tests and the processes they start."""

import os
import subprocess
import sys

import pytest
import torch

from tests import conftest


class FakeItem:
    """The two members of a collected test item the conftest hooks use."""

    def __init__(self, *names):
        self.names = set(names)

    def get_closest_marker(self, name):
        return getattr(pytest.mark, name).mark if name in self.names else None

    def add_marker(self, marker):
        self.names.add(marker.name)


def test_markers_are_registered_once_and_strict(pytestconfig):
    registered = [line.split(":")[0] for line in pytestconfig.getini("markers")]
    for name in ("slow", "ddp", "cuda"):
        assert registered.count(name) == 1, name
    assert pytestconfig.option.strict_markers


def test_ddp_tests_are_also_slow():
    ddp, plain = FakeItem("ddp"), FakeItem()
    conftest.pytest_collection_modifyitems(None, [ddp, plain])
    assert ddp.names == {"ddp", "slow"} and plain.names == set()


def test_cuda_tests_are_skipped_with_a_reason_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(pytest.skip.Exception, match="needs a CUDA device"):
        conftest.pytest_runtest_setup(FakeItem("cuda"))
    conftest.pytest_runtest_setup(FakeItem())  # unmarked: runs
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    conftest.pytest_runtest_setup(FakeItem("cuda"))  # with a device: runs


def test_tests_and_the_processes_they_start_use_the_configured_thread_count():
    threads = int(os.environ["OMP_NUM_THREADS"])  # conftest's 1 unless the caller exported another value
    assert torch.get_num_threads() == threads
    child = subprocess.run([sys.executable, "-c", "import os; print(os.environ['OMP_NUM_THREADS'])"],
                           capture_output=True, text=True, check=True)  # fmt: skip
    assert child.stdout.strip() == str(threads)
