"""tokentrail: trace how a prompt's next-token state moves through a transformer's layers."""

__version__ = "0.1.0"
