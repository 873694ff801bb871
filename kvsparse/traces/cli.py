"""Subcommands of this subpackage; ``register`` adds them to the ``kvsparse`` parser."""


def register(subparsers) -> None:
    """Add this subpackage's subcommands (none yet)."""
