"""The `ccim` entry point's subcommands, one module per subcommand family."""
