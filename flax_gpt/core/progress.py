"""Plain progress lines on stderr, for work that takes a while and may run in a log."""

import sys
import time

_START = time.perf_counter()


def print_progress(message):
    """One line on stderr: seconds since the process started, then `message`."""
    print(f"[{time.perf_counter() - _START:7.1f} s] {message}", file=sys.stderr, flush=True)
