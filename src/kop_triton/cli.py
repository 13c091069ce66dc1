"""What the four command-line tools (kop-train, kop-eval, kop-generate, kop-convert) share.

One convention for every error a user can fix, whether argparse or the tool finds it: one line
``PROG: error: MESSAGE`` on stderr (no usage dump, no traceback) and exit status 2; messages
name the flag (``--top-k``), not the Python argument behind it.
"""
from __future__ import annotations

import argparse
import sys

USAGE_EXIT = 2


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the tools' error convention (one line, exit status 2)."""

    def error(self, message):
        self.exit(USAGE_EXIT, f"{self.prog}: error: {message} (see --help)\n")


def fail(prog: str, message) -> int:
    """Print ``PROG: error: MESSAGE`` on stderr and return the exit status of a usage error."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    return USAGE_EXIT
