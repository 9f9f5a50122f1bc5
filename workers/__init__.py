"""Worker processes as CPUs: worker runtime, keg manager service, launcher, workloads.

Installed as ``shmalloc.workers`` (the folder sits at the top of the repository).
"""

import argparse


def positive_int(text):
    """argparse type: an int >= 1."""
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {text}")
    return n


def positive_seconds(text):
    """argparse type: a positive number of seconds."""
    s = float(text)
    if not s > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {text}")
    return s
