"""marco-controller: PAM login, live discovery, dynamic inventory and the live web viewer."""

from agent import __version__

__all__ = ["__version__"]
