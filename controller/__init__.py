"""marco-controller: PAM login, live discovery, dynamic inventory and the live web viewer."""

from marco import __version__

__all__ = ["__version__"]
