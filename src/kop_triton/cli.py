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


INTERRUPT_EXIT = 130   # 128 + SIGINT, what a shell reports for a Ctrl-C


def interrupted(prog: str) -> int:
    """The one line a Ctrl-C prints (no traceback); the tools write every file atomically, so
    nothing is left half-written."""
    print(f"{prog}: interrupted (Ctrl-C); every file written so far is complete", file=sys.stderr)
    return INTERRUPT_EXIT


def run_tool(prog: str, module: str, argv=None) -> int:
    """Import ``module`` and run its ``main(argv)``; a Ctrl-C at any point, the (slow) import of
    torch included, ends with one line and exit status 130."""
    try:
        import importlib
        return importlib.import_module(module).main(argv)
    except KeyboardInterrupt:
        return interrupted(prog)


def _entry(prog: str, module: str):
    def main() -> int:
        sys.exit(run_tool(prog, module))
    main.__name__ = prog.replace("-", "_")
    return main


# the console scripts (setup.py): kop-train, kop-eval, kop-generate, kop-convert
kop_train = _entry("kop-train", "kop_triton.train")
kop_eval = _entry("kop-eval", "kop_triton.eval")
kop_generate = _entry("kop-generate", "kop_triton.generate")
kop_convert = _entry("kop-convert", "kop_triton.convert")
