"""Counterfactual generators, one per module, each returning a :class:`CounterfactualOutput`."""

from .output import CounterfactualOutput

__all__ = ["CounterfactualOutput"]
