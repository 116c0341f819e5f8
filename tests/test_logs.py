"""Package logging: visible without configuration, like Lightning's; one line per event under DDP."""

import subprocess
import sys

import pytest

SCRIPT = """
import logging, sys
import ccim_lightning  # configures the package logger at import
from lightning.fabric.utilities.rank_zero import rank_zero_only
from ccim_lightning.logs import report_rank_failure
log = logging.getLogger("ccim_lightning.dictionary.recipe")
for rank in (0, 1):
    rank_zero_only.rank = rank
    print(f"=== rank {rank}", file=sys.stderr, flush=True)
    log.info("an info line")
    log.error("an error line")
    try:
        raise OSError("the cause, on this rank")
    except OSError as error:
        report_rank_failure(error)
"""


@pytest.fixture(scope="module")
def stderr_by_rank() -> dict[int, str]:
    """What a fresh interpreter that configured no logging shows as rank 0, then as rank 1 (one import for both)."""
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    _, rank0, rank1 = result.stderr.split("=== rank ")
    return {0: rank0, 1: rank1}


def test_info_lines_reach_a_user_who_configured_nothing(stderr_by_rank):
    err = stderr_by_rank[0]
    assert "INFO ccim_lightning.dictionary.recipe: an info line" in err
    assert "an error line" in err


def test_other_ranks_show_only_errors(stderr_by_rank):
    err = stderr_by_rank[1]
    assert "an info line" not in err and "an error line" in err


def test_errors_of_other_ranks_say_which_rank_and_a_failing_rank_reports_its_exception(stderr_by_rank):
    assert "[rank 1] ERROR ccim_lightning.dictionary.recipe: an error line" in stderr_by_rank[1]
    assert "[rank" not in stderr_by_rank[0]
    # rank 0 prints its own traceback; another rank's exception is logged with its text and traceback at once
    assert "rank 1 failed: OSError: the cause, on this rank" in stderr_by_rank[1]
    assert "Traceback (most recent call last)" in stderr_by_rank[1]
    assert stderr_by_rank[1].rstrip().endswith("OSError: the cause, on this rank")
    assert "the cause" not in stderr_by_rank[0]


def test_an_application_that_configured_logging_keeps_control(caplog):
    import logging

    with caplog.at_level(logging.INFO):
        logging.getLogger("ccim_lightning.commands.cli").info("through the root handlers")
    assert "through the root handlers" in caplog.text
