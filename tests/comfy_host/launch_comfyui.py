"""Start ComfyUI's main.py in this process, with the torchvision stub in place.

Usage: python launch_comfyui.py <comfyui_dir> [main.py arguments ...]

Used by :class:`comfy_host.runner.ComfyServer`; runs as a script, so it imports
only ``tv_stub`` from its own folder and then removes that folder from
``sys.path`` (our harness module names must not shadow ComfyUI's top-level
modules such as ``server`` or ``utils``).
"""

from __future__ import annotations

import os
import runpy
import sys


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    here = os.path.dirname(os.path.abspath(__file__))
    import tv_stub  # noqa: PLC0415  (found next to this file)

    # Stub the torchvision ops right before ComfyUI first imports torchvision,
    # without importing torch ahead of main.py.  The module stays in sys.modules,
    # which keeps its torch.library.Library alive.
    tv_stub.install_import_hook()

    comfy_dir = os.path.abspath(sys.argv[1])
    main_py = os.path.join(comfy_dir, "main.py")
    if not os.path.isfile(main_py):
        sys.exit(f"no ComfyUI main.py in {comfy_dir}")
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    sys.path.insert(0, comfy_dir)
    sys.argv = [main_py] + sys.argv[2:]
    runpy.run_path(main_py, run_name="__main__")


if __name__ == "__main__":
    main()
