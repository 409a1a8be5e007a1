"""Sub-commands: each module has `register(subparsers)` which sets `run` on its parser."""
from . import fuse_cmd, inspect_cmd

COMMANDS = [inspect_cmd, fuse_cmd]
