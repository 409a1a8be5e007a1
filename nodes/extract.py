"""Extract LoRA: the difference between a fine-tuned and a base model as a LoRA, from MODEL/CLIP inputs or
from two checkpoint files (streamed one tensor pair at a time)."""
from __future__ import annotations

from merge_core.errors import MergeCoreError
from merge_core.extract import DEFAULT_RANK, extract_lora

from .inputs import CATEGORY, budget_bytes, device_input, rank_inputs, rank_rule, seed_input, target_size_input
from .model_weights import model_weights
from .pack_lora import LORA_TYPE, PackLora, summary_line
from .runtime import file_signature, filename_list, model_file, run_job, torch_device

SEED_TOOLTIP = "seed of the randomized SVD sketches: same seed, same file"
MAX_RANK_NOTE = "; every layer is factored at max_rank first, then cut to its rank (one read of the models)"


def extraction_inputs() -> dict:
    """The CLI's rank modes: fixed --rank (default 32) or the energy rule, --conv-rank, --diff-only, --min-diff."""
    return {
        **rank_inputs(0.99, 4, 32, rank=DEFAULT_RANK),
        "conv_rank": ("INT", {"default": 0, "min": 0, "max": 4096,
                              "tooltip": "rank for 3×3 conv layers (LoCon): the fixed rank, or the max rank of the "
                                         "energy rule; 0 = as linear layers"}),
        "diff_only": ("BOOLEAN", {"default": False, "tooltip": "store every changed layer as an exact full diff "
                                                               "instead of a low-rank LoRA (large)"}),
        "min_diff": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.0001, "round": False,
                               "tooltip": "skip layers whose largest absolute change is at most this"}),
        **device_input(),
        **seed_input(SEED_TOOLTIP),
    }


def extract(base, tuned, label: str, rank: int, energy: float, min_rank: int, max_rank: int, conv_rank: int,
            diff_only: bool, min_diff: float, device: str, seed: int, text_encoders: bool = True,
            target_size_mb: float = 0.0) -> dict:
    size = budget_bytes(target_size_mb)
    rule = rank_rule(rank, energy, min_rank, max_rank, size)
    result = run_job(lambda progress: extract_lora(
        base, tuned, rule=rule, conv_rank=conv_rank or None, diff_only=diff_only, min_diff=min_diff,
        text_encoders=text_encoders, device=torch_device(device), seed=seed, progress=progress, target_size=size))
    return {"ui": {"text": [summary_line(result.report)]}, "result": (PackLora.from_result(result, label),)}


class ExtractFromModels:
    NODE_ID = "LoRArSVD_ExtractModels"
    DISPLAY_NAME = "Extract LoRA from Models (rSVD Merge)"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Extracts tuned − base as a LoRA from two MODELs (and optionally their CLIPs), e.g. two "
                   "checkpoints loaded with Load Checkpoint. Each model is read as it computes: its clean weights "
                   "plus its own patches (a LoRA-patched clone counts as tuned), one layer at a time.")
    RETURN_TYPES = (LORA_TYPE,)
    RETURN_NAMES = ("lora",)
    OUTPUT_TOOLTIPS = ("the extracted LoRA, with its per-module report",)
    FUNCTION = "extract"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "base_model": ("MODEL", {"tooltip": "the model before fine-tuning"}),
            "tuned_model": ("MODEL", {"tooltip": "the fine-tuned model (same architecture)"}),
            **extraction_inputs(),
        }, "optional": {
            "base_clip": ("CLIP", {"tooltip": "the base text encoders (connect both CLIPs to extract them too)"}),
            "tuned_clip": ("CLIP", {"tooltip": "the fine-tuned text encoders"}),
            **target_size_input(MAX_RANK_NOTE),
        }}

    def extract(self, base_model, tuned_model, device: str, base_clip=None, tuned_clip=None, **options) -> dict:
        if (base_clip is None) != (tuned_clip is None):
            raise MergeCoreError("connect both base_clip and tuned_clip, or neither (only the diffusion model is "
                                 "extracted then)")
        dev = torch_device(device)
        base = model_weights(base_model, base_clip, dev)
        tuned = model_weights(tuned_model, tuned_clip, dev)
        return extract(base, tuned, "extract (models)", device=device, **options)


class ExtractFromCheckpoints:
    NODE_ID = "LoRArSVD_ExtractCheckpoints"
    DISPLAY_NAME = "Extract LoRA from Checkpoints (rSVD Merge)"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Extracts tuned − base as a LoRA from two checkpoint files in the checkpoints folders, "
                   "streaming one tensor pair at a time (memory stays near one layer; no model is loaded).")
    RETURN_TYPES = (LORA_TYPE,)
    RETURN_NAMES = ("lora",)
    OUTPUT_TOOLTIPS = ("the extracted LoRA, with its per-module report",)
    FUNCTION = "extract"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        names = filename_list("checkpoints")
        return {"required": {
            "base_ckpt": (names, {"tooltip": "the checkpoint before fine-tuning"}),
            "tuned_ckpt": (names, {"tooltip": "the fine-tuned checkpoint (same architecture)"}),
            "text_encoders": ("BOOLEAN", {"default": True, "tooltip": "extract the text encoders too"}),
            **extraction_inputs(),
        }, "optional": target_size_input(MAX_RANK_NOTE)}

    @classmethod
    def IS_CHANGED(cls, base_ckpt: str, tuned_ckpt: str, **_: object) -> str:
        return file_signature("checkpoints", base_ckpt) + "|" + file_signature("checkpoints", tuned_ckpt)

    def extract(self, base_ckpt: str, tuned_ckpt: str, text_encoders: bool, **options) -> dict:
        base, tuned = model_file("checkpoints", base_ckpt), model_file("checkpoints", tuned_ckpt)
        return extract(base, tuned, f"extract ({tuned_ckpt} − {base_ckpt})", text_encoders=text_encoders,
                       **options)


NODES = (ExtractFromModels, ExtractFromCheckpoints)
