"""marco-agent: the node daemon that runs executions as the token's user and streams them."""

from marco import __version__

__all__ = ["__version__"]
