"""userbound: keep a VPN tunnel bound to the user who opened it."""

__version__ = "0.1.0"
