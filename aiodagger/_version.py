"""The package's version, in one place (the facade and the demo read it)."""

__version__ = "0.1.0"
