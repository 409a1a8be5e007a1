"""Shared pytest setup: the repo root and tests/ on sys.path, the inputs' hash cache in a temp folder (never the
user's; ComfyUI servers started by the tests inherit it), the real-ComfyUI fixtures and marker."""
import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

_cache = tempfile.mkdtemp(prefix="merge_core_cache_")
os.environ["MERGE_CORE_CACHE"] = _cache
atexit.register(shutil.rmtree, _cache, True)

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from comfy_host.fixtures import *  # noqa: E402,F401,F403  (comfyui marker, comfy_inprocess, comfy_server, ...)
