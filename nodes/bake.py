"""Bake LoRA into checkpoint: stream a checkpoint file, add strength·ΔW to every patched layer, and write a
new checkpoint under the output folder (default output/checkpoints/, which ComfyUI lists as a checkpoints
folder).  File to file, one tensor at a time: no model is loaded, fp32 compute, never overwrites."""
from __future__ import annotations

from pathlib import Path

from merge_core.bake import bake_lora
from merge_core.errors import MergeCoreError

from .inputs import CATEGORY, device_input
from .pack_lora import LORA_TYPE, PackLora
from .runtime import file_signature, filename_list, model_file, relative_to_output, run_job, save_numbered, \
    torch_device

NO_FILE = "none"
OUTPUT_DTYPES = ("same", "fp16", "bf16", "fp32")


class BakeLora:
    NODE_ID = "LoRArSVD_Bake"
    DISPLAY_NAME = "Bake LoRA into Checkpoint (rSVD Merge)"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Writes checkpoint + strength·ΔW as a new checkpoint file (<prefix>_00001_.safetensors under "
                   "the output folder; never overwrites). Streams the checkpoint one tensor at a time, computes in "
                   "fp32 and keeps every other tensor (VAE, ...) and the checkpoint's keys as they are.")
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("path",)
    OUTPUT_TOOLTIPS = ("the written checkpoint, relative to the output folder",)
    FUNCTION = "bake"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "ckpt_name": (filename_list("checkpoints"), {"tooltip": "the checkpoint to bake into (not modified)"}),
            "strength": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01,
                                   "tooltip": "LoRA strength, as strength_model/strength_clip in LoraLoader"}),
            "filename_prefix": ("STRING", {"default": "checkpoints/baked",
                                           "tooltip": "path under the output folder, without number and extension"}),
            "output_dtype": (list(OUTPUT_DTYPES), {"default": "same",
                                                   "tooltip": "dtype of the written weights; same = as in the "
                                                              "checkpoint"}),
            **device_input(),
        }, "optional": {
            "lora": (LORA_TYPE, {"tooltip": "a LoRA from the pack's nodes (or choose lora_name)"}),
            "lora_name": ([NO_FILE] + filename_list("loras"), {"default": NO_FILE,
                                                              "tooltip": "a LoRA file (when no lora is connected)"}),
        }}

    @classmethod
    def IS_CHANGED(cls, ckpt_name: str, lora_name: str = NO_FILE, **_: object) -> str:
        lora = file_signature("loras", lora_name) if lora_name != NO_FILE else ""
        return file_signature("checkpoints", ckpt_name) + "|" + lora

    def bake(self, ckpt_name: str, strength: float, filename_prefix: str, output_dtype: str, device: str,
             lora: PackLora = None, lora_name: str = NO_FILE) -> dict:
        if (lora is None) == (lora_name == NO_FILE):
            raise MergeCoreError("bake needs one LoRA: connect the lora input or choose a lora_name, not both")
        source = lora.lora if lora is not None else model_file("loras", lora_name)
        base = model_file("checkpoints", ckpt_name)
        dtype = None if output_dtype == "same" else output_dtype

        def write(path: Path) -> Path:
            run_job(lambda progress: bake_lora(base, source, path, alpha=strength, output_dtype=dtype,
                                               overwrite=False, device=torch_device(device), progress=progress))
            return path

        path = relative_to_output(save_numbered(filename_prefix, ".safetensors", write))
        return {"ui": {"text": [path]}, "result": (path,)}


NODES = (BakeLora,)
