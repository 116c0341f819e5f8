"""Logging as Lightning does it: INFO lines visible without configuring anything, each event once under DDP.

Errors are still shown by every rank, prefixed with the rank (``[rank 1] ERROR ...``) on ranks other than 0, and a
rank that fails says why at once (:func:`report_rank_failure`): under DDP the other ranks then only see their
collective break ("Connection closed by peer", a timeout), so the failing rank's own message is the one that names
the cause.
"""

from __future__ import annotations

import logging

from lightning.fabric.utilities.rank_zero import rank_zero_only

PACKAGE_LOGGER = "ccim_lightning"


def process_rank() -> int:
    """This process's global rank as Lightning set it (0 outside DDP)."""
    return int(getattr(rank_zero_only, "rank", 0) or 0)


class RankZeroFilter(logging.Filter):
    """Passes every record on rank 0 and only errors on the other ranks (one line per event under DDP)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or process_rank() == 0


class RankFormatter(logging.Formatter):
    """Prefixes the lines of ranks other than 0 with ``[rank N]``, so that an error says which process had it."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        rank = process_rank()
        return text if rank == 0 else f"[rank {rank}] {text}"


def report_rank_failure(exception: BaseException) -> None:
    """Logs ``exception`` (type, message, traceback) as an error of this rank, now; nothing on rank 0.

    For Lightning's ``on_exception`` hooks, which run on the failing rank before its teardown: rank 0 prints its
    own traceback where the user looks first; another rank's traceback would otherwise come only when that process
    ends (if the launcher lets it), after rank 0's report of a broken connection.
    """
    rank = process_rank()
    if rank == 0 or isinstance(exception, KeyboardInterrupt):
        return
    logging.getLogger(PACKAGE_LOGGER).error(
        "rank %d failed: %s: %s", rank, type(exception).__name__, exception, exc_info=exception
    )


def configure_package_logging() -> logging.Logger:
    """Sets up the ``ccim_lightning`` logger once, at import.

    Level INFO. When the application has configured no logging (the root logger has no handler), the package gets
    its own stream handler, which passes only errors on non-zero ranks (prefixed with the rank), and does not
    propagate, exactly as ``lightning.pytorch`` does. Otherwise records go to the application's handlers; add
    :class:`RankZeroFilter` (and :class:`RankFormatter`) to them for one line per event under DDP. (A filter must sit
    on the handler: a logger's own filters do not see the records of its child loggers.)
    """
    logger = logging.getLogger(PACKAGE_LOGGER)
    logger.setLevel(logging.INFO)
    if not logging.getLogger().hasHandlers() and not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(RankFormatter("%(levelname)s %(name)s: %(message)s"))
        handler.addFilter(RankZeroFilter())
        logger.addHandler(handler)
        logger.propagate = False
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its CPU-feature probing is not news to users
    return logger
