"""From labelled images to a counterfactual dataset: sources, segmentation, generators, the writer."""

__version__ = "0.1.0"
