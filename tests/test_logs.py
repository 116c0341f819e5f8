"""Package logging: visible without configuration, like Lightning's; one line per event under DDP."""

import subprocess
import sys

import pytest

SCRIPT = """
import logging, sys
import ccim_lightning  # configures the package logger at import
from lightning.fabric.utilities.rank_zero import rank_zero_only
log = logging.getLogger("ccim_lightning.dictionary.recipe")
for rank in (0, 1):
    rank_zero_only.rank = rank
    print(f"=== rank {rank}", file=sys.stderr, flush=True)
    log.info("an info line")
    log.error("an error line")
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


def test_an_application_that_configured_logging_keeps_control(caplog):
    import logging

    with caplog.at_level(logging.INFO):
        logging.getLogger("ccim_lightning.commands.cli").info("through the root handlers")
    assert "through the root handlers" in caplog.text
