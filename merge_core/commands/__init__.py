"""Sub-commands: each module has `register(subparsers)` which sets `run` on its parser."""
from . import fuse_cmd, inspect_cmd

from . import bake_cmd, extract_cmd  # noqa: E402

from . import merge_cmd  # noqa: E402

COMMANDS = [inspect_cmd, fuse_cmd, extract_cmd, bake_cmd, merge_cmd]
