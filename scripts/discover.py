#!/usr/bin/env python
"""Find the phrases a classifier relies on (ASPIRE). See ``python scripts/discover.py --help``."""

import sys

from augment.discover import cli

if __name__ == "__main__":
    sys.exit(cli())
