"""Helpers shared by the command-line entry points (launch/, tools/): argument types, a fast exit."""

from __future__ import annotations

import argparse
import logging
import os
import sys


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1, so a 0 or negative count is a usage error naming the option, not a traceback."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def exit_now(code: int) -> None:
    """Flush the output and end the process with ``code`` at once, skipping the interpreter's teardown.

    For a process that has imported torch/deepspeed/megatron, Python's teardown (atexit handlers, then finalizing
    every module and object) took 1-3 s of CPU on a 2-core machine after the work was done: in every launcher
    process and every rank, one after the other. Call it only when nothing is left to finish: files closed, worker
    processes and process groups shut down (what the caller's own cleanup does); atexit handlers do not run.
    """
    logging.shutdown()  # flush and close logging's handlers (atexit would)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or a broken pipe: nothing more can be written anyway
            pass
    os._exit(code & 0xFF)  # what exit(code) hands the parent, e.g. 247 for sys.exit(-9)
