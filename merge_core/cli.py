"""The command line: one sub-command per operation, sharing one argument style
(-o/--output, --device, --dtype, --report, --overwrite).  Errors print one line and exit 2 (an unforeseen
exception: 1, its traceback with -v)."""
from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import threading
from typing import Iterator, Optional, Sequence

from . import __version__
from .commands import COMMANDS
from .errors import INTERRUPTED, MergeCoreError


class OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line (`error: …`, exit 2), not argparse's usage block; sub-commands inherit it."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


VERBOSE_HELP = "log progress per module"


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m merge_core",
                           description="Merge, resize, fuse, extract and inspect LoRA / LyCORIS files exactly.")
    parser.add_argument("--version", action="version", version=f"lora-rsvd-merge {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        command.register(sub)
    for command_parser in sub.choices.values():  # -v also after the command (unset there: the top level's stands)
        command_parser.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                                    help=VERBOSE_HELP)
    return parser


STOPS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM") if hasattr(signal, name))


@contextlib.contextmanager
def noting_interrupts() -> Iterator[list]:
    """Ctrl-C (and a kill's SIGTERM) raise KeyboardInterrupt, so every temp file is removed on the way out, and
    are noted in the yielded list: an interrupt that lands inside a native call (safetensors' reader) can come
    out of it as another exception."""
    noted: list = []
    if threading.current_thread() is not threading.main_thread():
        yield noted
        return

    def interrupt(signum, frame):
        noted.append(signum)
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, interrupt) for sig in STOPS}
    try:
        yield noted
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class WarningsPrefixed(logging.Formatter):
    """Warnings as `warning: …`, beside the errors' `error: …`; -v's progress lines as they are."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return f"warning: {text}" if record.levelno >= logging.WARNING else text


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = logging.StreamHandler()
    handler.setFormatter(WarningsPrefixed("%(message)s"))
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, handlers=[handler])
    with noting_interrupts() as interrupted:
        try:
            return int(args.run(args) or 0)
        except MergeCoreError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except (Exception, KeyboardInterrupt) as exc:
            if not (interrupted or isinstance(exc, KeyboardInterrupt)):
                if args.verbose:
                    raise
                print(unexpected_error_line(exc), file=sys.stderr)
                return 1
            print(INTERRUPTED, file=sys.stderr)
            return 128 + (interrupted[0] if interrupted else signal.SIGINT)


def unexpected_error_line(exc: BaseException) -> str:
    """One line for an exception no check foresaw (exit 1): out of memory as such, anything else as the bug it
    is, with how to get the traceback for a report.  The temp files are already gone, as for every error."""
    what = (str(exc).strip().splitlines() or [""])[0][:300]
    if isinstance(exc, MemoryError):
        return (f"error: out of memory{' (' + what + ')' if what else ''}; free some memory (merge, fuse: fewer "
                "--threads hold fewer modules at once)")
    return (f"error: internal error ({type(exc).__name__}: {what}). This is a bug in lora-rsvd-merge {__version__}: "
            "please report it with the command line; -v prints the traceback")
