#!/usr/bin/env python
"""The main job: the whole pipeline on the built-in benchmark. See `python scripts/demo.py --help`."""

import sys

from debias.demo import cli

if __name__ == "__main__":
    sys.exit(cli())
