"""marco-agent: the node daemon that runs executions as the token's user and streams them."""

__version__ = "0.1.0"
