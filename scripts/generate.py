#!/usr/bin/env python
"""Build a counterfactual dataset. See ``python scripts/generate.py --help``."""

import sys

from augment.pipeline import cli

if __name__ == "__main__":
    sys.exit(cli())
