"""pytest plumbing for tests that need the real ComfyUI.

In ``tests/conftest.py``::

    from comfy_host.fixtures import *  # noqa: F401,F403  (fixtures + marker hook)

or pick names.  A test module may also import the fixtures it uses directly.

* marker ``comfyui``: the test needs ComfyUI 0.3.75 (installed on first use by
  ``tests/comfy_host/install.py``).  ``pytest -m "not comfyui"`` skips them.
* ``comfy_inprocess``     session: ComfyUI importable in-process (returns its dir)
* ``sdxl_key_map``        session: ComfyUI's SDXL LoRA key map (a copy)
* ``sdxl_modules``        session: merge_core/data/sdxl_modules.json as a dict
* ``comfy_server``        module: a running :class:`ComfyServer` with this pack
  (loras/checkpoints in per-module temp folders: ``comfy_server.loras_dir``)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .inprocess import import_comfy, sdxl_lora_key_map
from .runner import REPO_ROOT, ComfyServer

MARKER = "comfyui"
MARKER_HELP = f"{MARKER}: needs a real ComfyUI 0.3.75 (tests/comfy_host; in-process or a server)"
SDXL_TABLE = REPO_ROOT / "merge_core" / "data" / "sdxl_modules.json"


def register_marker(config) -> None:
    """Register the ``comfyui`` marker (call from ``pytest_configure``)."""
    config.addinivalue_line("markers", MARKER_HELP)


def pytest_configure(config):  # picked up when star-imported into a conftest
    register_marker(config)


def load_sdxl_table(path: Path = SDXL_TABLE) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def comfy_inprocess() -> Path:
    return import_comfy()


@pytest.fixture(scope="session")
def sdxl_key_map(comfy_inprocess) -> dict:
    return sdxl_lora_key_map()


@pytest.fixture(scope="session")
def sdxl_modules() -> dict:
    return load_sdxl_table()


@pytest.fixture(scope="module")
def comfy_server(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfy_server")
    server = ComfyServer(
        loras_dir=base / "loras",
        checkpoints_dir=base / "checkpoints",
        workdir=base / "work",
    )
    with server:
        yield server


__all__ = [
    "MARKER", "MARKER_HELP", "SDXL_TABLE", "register_marker", "pytest_configure",
    "load_sdxl_table", "comfy_inprocess", "sdxl_key_map", "sdxl_modules", "comfy_server",
]
