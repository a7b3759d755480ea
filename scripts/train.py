#!/usr/bin/env python
"""See `python scripts/train.py --help`. Runs under `accelerate launch` as well as plain python."""

import sys

from debias.train import cli

if __name__ == "__main__":
    sys.exit(cli())
