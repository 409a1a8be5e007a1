"""Shared pytest setup: the repo root and tests/ on sys.path, the real-ComfyUI fixtures and marker."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from comfy_host.fixtures import *  # noqa: E402,F401,F403  (comfyui marker, comfy_inprocess, comfy_server, ...)
