#!/usr/bin/env python
"""See `python scripts/evaluate.py --help`. Runs under `accelerate launch` as well as plain python."""

import sys

from debias.evaluate import cli

if __name__ == "__main__":
    sys.exit(cli())
