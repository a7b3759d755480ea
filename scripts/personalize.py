#!/usr/bin/env python
"""Personalised generation (ASPIRE step 5, DA-Fusion): per-class textual inversion or DreamBooth-LoRA,
then text-to-image into a new dataset folder. See ``python scripts/personalize.py {train,generate} --help``;
``train`` also runs under ``accelerate launch``."""

import sys

from augment.synthesize.personalize import cli

if __name__ == "__main__":
    sys.exit(cli())
