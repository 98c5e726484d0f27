"""MoEscope models and everything needed to train or run them."""

__version__ = "0.1.0"
