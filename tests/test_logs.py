"""Package logging: visible without configuration, like Lightning's; one line per event under DDP."""

import subprocess
import sys

SCRIPT = """
import logging, sys
import ccim_lightning  # configures the package logger at import
from lightning.fabric.utilities.rank_zero import rank_zero_only
log = logging.getLogger("ccim_lightning.dictionary.recipe")
rank_zero_only.rank = int(sys.argv[1])
log.info("an info line")
log.error("an error line")
"""


def run(rank: int) -> str:
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(rank)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stderr


def test_info_lines_reach_a_user_who_configured_nothing():
    err = run(0)
    assert "INFO ccim_lightning.dictionary.recipe: an info line" in err
    assert "an error line" in err


def test_other_ranks_show_only_errors():
    err = run(1)
    assert "an info line" not in err and "an error line" in err


def test_an_application_that_configured_logging_keeps_control(caplog):
    import logging

    with caplog.at_level(logging.INFO):
        logging.getLogger("ccim_lightning.commands.cli").info("through the root handlers")
    assert "through the root handlers" in caplog.text
