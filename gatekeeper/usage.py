"""How a command line is refused: one line on stderr, exit code 2, no traceback.

Both commands (`gatekeeper [flags] [-- COMMAND]` and `gatekeeper status|weight`)
use this parser, so argparse's own "print usage and exit" never runs: the caller
catches `UsageError`, prints its one line prefixed with the command's name, and
returns `EXIT_USAGE` (the UNIX convention for a usage error, as distccd uses).
"""

from __future__ import annotations

import argparse
from typing import NoReturn

EXIT_USAGE = 2


class UsageError(Exception):
    """A bad flag or value: one line, exit 2."""


class Parser(argparse.ArgumentParser):
    """argparse that raises `UsageError` instead of printing usage and exiting."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)
