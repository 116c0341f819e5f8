"""Decode-time skips under DDP (2 gloo CPU processes): every rank's skips reported once, on rank 0, with the files."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.datamodules.test_base import table_root

JOB = Path(__file__).with_name("ddp_skip_job.py")


def make_undecodable(path: Path) -> None:
    """A PNG whose header is fine (the setup check passes) and whose pixels cannot be decoded."""
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:300])


@pytest.mark.slow
@pytest.mark.ddp
def test_a_skip_on_rank_1_is_counted_and_named_on_rank_0_and_small_batches_do_not_end_the_run(tmp_path, write_image):
    root = table_root(tmp_path, write_image, ["train"] * 8 + ["val"] * 4)
    make_undecodable(root / "3.png")  # a training sample: its batch of 2 shrinks to 1 (BatchNorm)
    make_undecodable(root / "9.png")  # val position 1: rank 1's shard (DistributedSampler, no shuffle)
    out = tmp_path / "out"
    out.mkdir()
    result = subprocess.run(
        [sys.executable, str(JOB), str(root), str(out)], capture_output=True, text=True, timeout=300,
        cwd=Path(__file__).parents[2],
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    rank0 = json.loads((out / "rank0.json").read_text())
    rank1 = json.loads((out / "rank1.json").read_text())
    decode = "skipped (image fails to decode)"
    assert rank0["dropped"]["val"] == {decode: 1}  # rank 1's skip, merged into rank 0's count
    assert rank0["dropped"]["train"] == {decode: 1}
    # one summary per split and run, from rank 0 only, naming the file
    summaries = [line for line in result.stderr.splitlines() if "samples skipped so far" in line]
    assert len(summaries) == 2, summaries
    assert sum("Files: 9.png" in line for line in summaries) == 1
    assert sum("Files: 3.png" in line for line in summaries) == 1
    # batch size 1: rank 1's undecodable sample gave an empty batch, skipped; its rows are missing, nothing else
    assert rank1["skipped_batches"]["val: a batch with no sample (all failed to decode) is skipped"] >= 1
    assert rank0["predicted"] == [0, 2] and rank1["predicted"] == [3]
    # the second fit, batch size 1: one rank met the undecodable training image as an empty batch and took part in
    # the step's collectives with a zero loss (else the other rank would have waited for ever)
    empty = "train: a training batch with no sample (all failed to decode) is skipped"
    assert rank0["skipped_batches"].get(empty, 0) + rank1["skipped_batches"].get(empty, 0) == 1


@pytest.mark.slow
@pytest.mark.ddp
def test_the_exception_of_a_failing_rank_other_than_0_reaches_the_user_with_its_rank(tmp_path, write_image):
    root = table_root(tmp_path, write_image, ["train"] * 8 + ["val"] * 4)
    out = tmp_path / "out"
    out.mkdir()
    result = subprocess.run(
        [sys.executable, str(JOB), str(root), str(out), "--fail"], capture_output=True, text=True, timeout=300,
        cwd=Path(__file__).parents[2],
    )  # fmt: skip
    assert result.returncode != 0
    assert "[rank 1] ERROR ccim_lightning: rank 1 failed: RuntimeError: injected failure in rank 1's training step" in (
        result.stderr
    ), result.stderr[-4000:]
