"""SACPO pipeline steps: plain functions with small CLIs, called by the Snakemake rules."""

import time as _time

__version__ = "0.1.0"

# Taken when the package is first imported, i.e. right after interpreter start-up:
# the reference for the jobs' start-up times ("first training step after X s").
_PROCESS_START = _time.monotonic()


def seconds_since_start() -> float:
    """Seconds since this process imported the package (about since it started)."""
    return _time.monotonic() - _PROCESS_START
