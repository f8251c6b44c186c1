"""bnpass's version, recorded in every model and report it writes."""

__version__ = "0.1.0"
