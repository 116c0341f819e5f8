import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

JOB = Path(__file__).with_name("ddp_dictionary_job.py")


def run_job(out: Path, devices: int, *options: str, cache: Path | None = None, ok: bool = True):
    out.mkdir()
    result = subprocess.run(
        [sys.executable, str(JOB), str(out), str(devices), *(["--cache", str(cache)] if cache else []), *options],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if ok:
        assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.mark.slow
@pytest.mark.ddp
def test_ddp_dictionary_is_identical_on_every_rank_and_to_a_single_process_build(tmp_path):
    run_job(tmp_path / "ddp", 2)
    run_job(tmp_path / "single", 1)
    rank0 = torch.load(tmp_path / "ddp" / "rank0.pt")
    rank1 = torch.load(tmp_path / "ddp" / "rank1.pt")
    single = torch.load(tmp_path / "single" / "rank0.pt")
    assert rank0["world_size"] == rank1["world_size"] == 2
    assert torch.equal(rank0["dictionary"], rank1["dictionary"])
    assert torch.equal(rank0["prior"], rank1["prior"])
    # Every sample counted once (75 samples: the sampler's padding repeat is dropped).
    assert torch.allclose(rank0["prior"] * 75, (rank0["prior"] * 75).round(), atol=1e-4)
    assert rank0["clusters"].shape == (75,) and torch.equal(rank0["clusters"], rank1["clusters"])
    assert rank0["clusters"].min() >= 0
    counts = torch.bincount(rank0["clusters"], minlength=6).float()
    torch.testing.assert_close(rank0["prior"], counts / 75)
    # The same seed gives the same dictionary in one process and on two ranks (the draws follow sample indices, not
    # ranks): prototypes up to float summation order, the same clusters, priors and objective.
    assert single["world_size"] == 1
    torch.testing.assert_close(rank0["dictionary"], single["dictionary"], rtol=1e-5, atol=1e-5)
    assert torch.equal(rank0["clusters"], single["clusters"])
    torch.testing.assert_close(rank0["prior"], single["prior"], rtol=0, atol=1e-7)
    assert rank0["inertia"] == pytest.approx(single["inertia"], rel=1e-6)


@pytest.mark.slow
@pytest.mark.ddp
def test_without_lambda_trains_under_ddp_with_the_default_strategy(tmp_path):
    run_job(tmp_path / "uniform", 2, "--uniform")  # DDP raises on unused parameters otherwise


@pytest.mark.slow
@pytest.mark.ddp
def test_a_failure_on_one_rank_ends_every_rank_within_a_minute(tmp_path):
    start = time.monotonic()
    result = run_job(tmp_path / "fail", 2, "--fail-rank", "1", ok=False)
    assert result.returncode != 0
    assert time.monotonic() - start < 120  # the process-group timeout would be 30 minutes (hours in ddp.yaml)
    assert "injected failure on rank 1" in result.stderr
    assert "another rank failed" in result.stderr


@pytest.mark.slow
@pytest.mark.ddp
def test_ddp_ranks_agree_on_reusing_a_cached_dictionary(tmp_path):
    cache = tmp_path / "dictionary.pt"
    run_job(tmp_path / "build", 2, cache=cache)
    assert cache.exists()
    run_job(tmp_path / "reuse", 2, cache=cache)
    built = torch.load(tmp_path / "build" / "rank0.pt")
    for rank in (0, 1):
        reused = torch.load(tmp_path / "reuse" / f"rank{rank}.pt")
        assert torch.equal(reused["dictionary"], built["dictionary"])
        assert torch.equal(reused["prior"], built["prior"])
