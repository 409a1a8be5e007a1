"""Test harness around a real ComfyUI 0.3.75 (see tests/comfy_host/install.py).

In-process (CPU, meta device, no weights)::

    from comfy_host import import_comfy, sdxl_lora_key_map, load_lora_with_comfy
    patches, not_loaded = load_lora_with_comfy(state_dict)

Headless server in a subprocess::

    from comfy_host import ComfyServer
    with ComfyServer(loras_dir=d) as srv:
        srv.object_info(); srv.run(prompt)

pytest: tests needing ComfyUI carry the ``comfyui`` marker; fixtures live in
``comfy_host.fixtures`` (import them from a conftest).
"""

from .install import COMFYUI_VERSION, InstallError, install, is_installed
from .inprocess import (
    SDXL_UNET_CONFIG,
    comfyui_dir,
    import_comfy,
    load_lora_with_comfy,
    sdxl_lora_key_map,
    sdxl_model_and_clip_meta,
)
from .runner import PACK_NAME, REPO_ROOT, ComfyServer, ComfyServerError, free_port
from .tv_stub import apply_torchvision_stub

MARKER = "comfyui"

__all__ = [
    "COMFYUI_VERSION", "InstallError", "install", "is_installed",
    "SDXL_UNET_CONFIG", "comfyui_dir", "import_comfy", "load_lora_with_comfy",
    "sdxl_lora_key_map", "sdxl_model_and_clip_meta",
    "PACK_NAME", "REPO_ROOT", "ComfyServer", "ComfyServerError", "free_port",
    "apply_torchvision_stub", "MARKER",
]
