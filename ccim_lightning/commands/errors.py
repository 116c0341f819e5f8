"""The one kind of error a ``ccim`` subcommand raises for bad input; ``ccim`` prints it as ``ccim: error: ...``."""


class CommandError(Exception):
    """A command line, config or input file the subcommand cannot use; the message says what and how to fix it."""
