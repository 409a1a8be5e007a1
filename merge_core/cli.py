"""The command line: one sub-command per operation, sharing one argument style
(-o/--output, --device, --dtype, --report, --overwrite).  Errors print one line and exit 2."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence

from . import __version__
from .commands import COMMANDS
from .errors import MergeCoreError


class OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line (`error: …`, exit 2), not argparse's usage block; sub-commands inherit it."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


VERBOSE_HELP = "log progress per module"


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m merge_core",
                           description="Merge, fuse, extract and inspect LoRA / LyCORIS files exactly.")
    parser.add_argument("--version", action="version", version=f"lora-rsvd-merge {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        command.register(sub)
    for command_parser in sub.choices.values():  # -v also after the command (unset there: the top level's stands)
        command_parser.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                                    help=VERBOSE_HELP)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return int(args.run(args) or 0)
    except MergeCoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; no output was written", file=sys.stderr)
        return 130
