"""The ``ccim`` command: its entry point and every subcommand, above every other layer of the package."""
