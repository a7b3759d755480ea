#!/usr/bin/env python
"""Publish a dataset or model folder to the Hugging Face Hub. See ``python scripts/publish.py --help``."""

import sys

from augment.publish import cli

if __name__ == "__main__":
    sys.exit(cli())
