"""CLAD training and background-reliance evaluation."""

__version__ = "0.1.0"
