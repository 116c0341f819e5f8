"""Shared fixtures, and the one place the markers of setup.cfg act: ``ddp`` implies ``slow``, ``cuda`` skips without
a CUDA device."""

import os
from pathlib import Path

# One OpenMP thread for torch and FAISS, here and in every process a test starts (the variable is inherited): the
# tests' tensors are tiny, so a thread pool only adds its synchronisation, and on a CPU shared with other work each
# parallel region waits for a descheduled thread (measured: half the CPU time, a third of the wall time under load).
# Set before torch is imported; a value the caller exported wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

BACKGROUND = (40, 160, 90)
SUBJECT = (220, 30, 200)
SHARED_DATA = Path(__file__).parents[2] / "shared" / "data"
"""Real annotation files (../shared/data relative to the project root); absent in a user's clone."""


def _write_image(path, width=64, height=48, box=None, fmt=None):
    """Writes a flat BACKGROUND image with the box (x1, y1, x2, y2) filled with SUBJECT; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.empty((height, width, 3), dtype=np.uint8)
    pixels[...] = BACKGROUND
    if box is not None:
        x1, y1, x2, y2 = (int(round(v)) for v in box)
        pixels[max(y1, 0) : max(y2, 0), max(x1, 0) : max(x2, 0)] = SUBJECT
    Image.fromarray(pixels).save(path, format=fmt)
    return path


@pytest.fixture
def write_image():
    """``write_image(path, width=64, height=48, box=None, fmt=None)``: a flat image with the box in another colour."""
    return _write_image


@pytest.fixture
def shared_data():
    """The real annotation files folder; the test is skipped when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is absent (real annotation files are only in the development checkout)")
    return SHARED_DATA


@pytest.fixture
def colours():
    """The ImageNet-normalised BACKGROUND and SUBJECT colours of ``write_image`` images, as (3,) arrays."""
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    return tuple((np.asarray(colour) / 255.0 - mean) / std for colour in (BACKGROUND, SUBJECT))


@pytest.hookimpl(tryfirst=True)  # before pytest's own `-m` selection, so `-m "not slow"` leaves the ddp tests out
def pytest_collection_modifyitems(config, items):
    """Every ``ddp`` test is also ``slow``: several processes each importing torch and Lightning take minutes."""
    for item in items:
        if item.get_closest_marker("ddp") is not None and item.get_closest_marker("slow") is None:
            item.add_marker(pytest.mark.slow)


def pytest_runtest_setup(item):
    """A ``cuda`` test is skipped, with the reason, where no CUDA device is visible."""
    if item.get_closest_marker("cuda") is not None and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (marked `cuda`); none is visible to torch here")
