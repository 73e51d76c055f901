"""Galaxy: a peer-to-peer compute mesh."""

__version__ = "0.1.0"
