"""Logging as Lightning does it: INFO lines visible without configuring anything, each event once under DDP.

Errors are still shown by every rank.
"""

from __future__ import annotations

import logging

from lightning.fabric.utilities.rank_zero import rank_zero_only

PACKAGE_LOGGER = "ccim_lightning"


class RankZeroFilter(logging.Filter):
    """Passes every record on rank 0 and only errors on the other ranks (one line per event under DDP)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or getattr(rank_zero_only, "rank", 0) == 0


def configure_package_logging() -> logging.Logger:
    """Sets up the ``ccim_lightning`` logger once, at import.

    Level INFO. When the application has configured no logging (the root logger has no handler), the package gets
    its own stream handler, which passes only errors on non-zero ranks, and does not propagate, exactly as
    ``lightning.pytorch`` does. Otherwise records go to the application's handlers; add :class:`RankZeroFilter` to
    them for one line per event under DDP. (A filter must sit on the handler: a logger's own filters do not see
    the records of its child loggers.)
    """
    logger = logging.getLogger(PACKAGE_LOGGER)
    logger.setLevel(logging.INFO)
    if not logging.getLogger().hasHandlers() and not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        handler.addFilter(RankZeroFilter())
        logger.addHandler(handler)
        logger.propagate = False
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its CPU-feature probing is not news to users
    return logger
