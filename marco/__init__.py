"""Marco's shared library: the wire protocol, tokens, TLS, errors, settings, the agent client,
discovery and the user's tools (`marco`, `marco-inventory`). The node daemon (`agent`), the
controller (`controller`) and the Ansible side (`ansible_plugins`) all build on it; it imports
none of them."""

__version__ = "0.1.0"
