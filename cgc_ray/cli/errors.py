"""How every command line of cgc-ray reports a user's mistake: ``error: <message>`` on stderr, exit status 2.

One format for ``cgc-ray <command>``, ``cgc-ray run`` and the experiment scripts, for the checks of cgc-ray
and for argparse's own usage errors alike, so a wrapper script can match one prefix.
"""

from __future__ import annotations

import argparse
import sys

EXIT_USAGE = 2  # argparse's status for a bad command line; ours for a bad spec, path or storage


def fail(problem: BaseException | str) -> int:
    """Print ``error: <problem>`` to stderr, every line of it (a missing dataset lists its layout); returns 2."""
    text = str(problem).strip() or type(problem).__name__
    print(f"error: {text}", file=sys.stderr)
    return EXIT_USAGE


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with its usage errors in the format of :func:`fail` (subparsers inherit the class)."""

    def error(self, message: str):  # noqa: D102 - argparse's hook
        self.print_usage(sys.stderr)
        sys.exit(fail(f"{self.prog}: {message}"))
