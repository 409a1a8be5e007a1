"""Use the real ComfyUI in the current process (CPU only, no weights).

Everything here builds models on the ``meta`` device: module structure, parameter
names and shapes are real, no memory is allocated for weights.
"""

from __future__ import annotations

import functools
import logging
import sys
import threading
from pathlib import Path
from typing import Any

from .install import COMFYUI_VERSION, default_dir, install, is_installed
from .tv_stub import apply_torchvision_stub

_lock = threading.RLock()
_imported_from: Path | None = None

# The full SDXL base UNet config, as ComfyUI's model detection derives it from an
# SDXL checkpoint (architecture facts: 3 levels, 2 res blocks each, transformer
# depths 0/2/10, linear proj_in/proj_out, 2048-dim context, 2816-dim ADM input).
SDXL_UNET_CONFIG: dict[str, Any] = {
    "use_checkpoint": False,
    "image_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 320,
    "num_res_blocks": [2, 2, 2],
    "channel_mult": [1, 2, 4],
    "transformer_depth": [0, 0, 2, 2, 10, 10],
    "transformer_depth_middle": 10,
    "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
    "use_spatial_transformer": True,
    "use_linear_in_transformer": True,
    "context_dim": 2048,
    "num_head_channels": 64,
    "legacy": False,
    "num_classes": "sequential",
    "adm_in_channels": 2816,
    "use_temporal_attention": False,
    "use_temporal_resblock": False,
}

NOT_LOADED_PREFIX = "lora key not loaded: "


def comfyui_dir(auto_install: bool = True) -> Path:
    """The ComfyUI 0.3.75 tree the tests use; installed on first use if allowed."""
    target = default_dir()
    if is_installed(target):
        return target
    if not auto_install:
        raise RuntimeError(
            f"ComfyUI {COMFYUI_VERSION} is not installed at {target}; "
            "run `python tests/comfy_host/install.py` (or .ci/install.sh) first")
    try:
        return install(target)
    except Exception as exc:  # pip/network failure: say what to do
        raise RuntimeError(
            f"could not install ComfyUI {COMFYUI_VERSION} into {target}: {exc}\n"
            "run `python tests/comfy_host/install.py` by hand to see the details") from exc


def import_comfy() -> Path:
    """Make ``import comfy.*`` work in this process, on CPU.  Idempotent.

    Puts the ComfyUI tree first on ``sys.path``, defines the torchvision op
    schemas if needed, and parses ComfyUI's command line as ``--cpu`` (with the
    real ``sys.argv`` restored afterwards).  Returns the ComfyUI directory.
    """
    global _imported_from
    with _lock:
        if _imported_from is not None:
            return _imported_from
        root = comfyui_dir()
        apply_torchvision_stub()

        loaded = sys.modules.get("comfy")
        if loaded is not None:
            origin = Path(getattr(loaded, "__file__", "") or "").resolve()
            if root.resolve() not in origin.parents:
                raise RuntimeError(f"a different `comfy` package is already imported: {origin}")
        root_s = str(root)
        if root_s in sys.path:
            sys.path.remove(root_s)
        sys.path.insert(0, root_s)

        import comfy.options

        comfy.options.enable_args_parsing()
        saved_argv = sys.argv
        sys.argv = [str(root / "main.py"), "--cpu"]
        try:
            import comfy.cli_args
            import comfy.model_management  # noqa: F401  (decides the device from args)
        finally:
            sys.argv = saved_argv
        if not comfy.cli_args.args.cpu:
            raise RuntimeError("comfy.cli_args was imported earlier without --cpu; "
                               "call import_comfy() before anything imports comfy")
        _imported_from = root
        return root


@functools.lru_cache(maxsize=1)
def sdxl_model_and_clip_meta():
    """Real SDXL base model objects without weights (meta device).

    Returns ``(model, clip_model)``: ``model`` is ComfyUI's ``comfy.model_base.SDXL``
    (``BaseModel``; what ``comfy.lora.model_lora_keys_unet`` takes, its UNet is
    ``model.diffusion_model``) and ``clip_model`` is ``comfy.sdxl_clip.SDXLClipModel``
    (what ``comfy.lora.model_lora_keys_clip`` takes: ComfyUI passes
    ``CLIP.cond_stage_model``, whose state dict keys start ``clip_l.`` / ``clip_g.``).
    Cached: treat both as read-only.
    """
    import_comfy()
    import torch
    import comfy.model_detection
    import comfy.sdxl_clip

    meta = torch.device("meta")
    config = dict(SDXL_UNET_CONFIG, dtype=torch.float32)
    model_config = comfy.model_detection.model_config_from_unet_config(config)
    if model_config is None or type(model_config).__name__ != "SDXL":
        raise RuntimeError(f"ComfyUI did not detect SDXL from the config, got {model_config!r}")
    model = model_config.get_model({}, device=meta)
    clip_model = comfy.sdxl_clip.SDXLClipModel(device=meta, dtype=torch.float32)
    return model, clip_model


@functools.lru_cache(maxsize=1)
def _sdxl_key_map_cached() -> dict[str, Any]:
    import_comfy()
    import comfy.lora

    model, clip_model = sdxl_model_and_clip_meta()
    key_map: dict[str, Any] = {}
    # Always pass a fresh dict: the functions' default `key_map={}` is a shared
    # mutable default that would accumulate between calls.
    comfy.lora.model_lora_keys_unet(model, key_map)
    comfy.lora.model_lora_keys_clip(clip_model, key_map)
    return key_map


def sdxl_lora_key_map() -> dict[str, Any]:
    """ComfyUI's LoRA key map for SDXL base (UNet + both text encoders).

    Maps every LoRA module name ComfyUI accepts (kohya ``lora_unet_*``,
    ``lora_te1_*``, ``lora_te2_*``, diffusers, generic ...) to the model
    state-dict key it patches, exactly as ``LoraLoader`` builds it.  A copy of a
    cached dict is returned.
    """
    return dict(_sdxl_key_map_cached())


class _RecordCollector(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def load_lora_with_comfy(state_dict, key_map: dict | None = None):
    """Run ComfyUI's own ``comfy.lora.load_lora`` on a LoRA state dict.

    Returns ``(patches, not_loaded)``: the patch dict ComfyUI would apply (model
    key -> adapter) and the list of LoRA tensor names ComfyUI logged as
    ``lora key not loaded`` (in log order).  ``key_map`` defaults to
    :func:`sdxl_lora_key_map`.
    """
    import_comfy()
    import comfy.lora

    if key_map is None:
        key_map = _sdxl_key_map_cached()
    collector = _RecordCollector()
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(collector)
    if root.level > logging.WARNING:
        root.setLevel(logging.WARNING)
    try:
        patches = comfy.lora.load_lora(state_dict, key_map)
    finally:
        root.removeHandler(collector)
        root.setLevel(old_level)
    not_loaded = []
    for record in collector.records:
        msg = record.getMessage()
        if msg.startswith(NOT_LOADED_PREFIX):
            not_loaded.append(msg[len(NOT_LOADED_PREFIX):])
    return patches, not_loaded
