"""elasticmoe: train once, extract many."""

__version__ = "0.1.0"
