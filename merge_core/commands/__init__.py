"""Sub-commands: each module has `register(subparsers)` which sets `run` on its parser."""
from . import inspect_cmd

COMMANDS = [inspect_cmd]
