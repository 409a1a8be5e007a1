"""Resize LoRA: one LoRA / LoCon / LoHa / LoKr re-factored as a LoRA at new ranks (a merge of one input:
T = ΔW, truncated by its SVD from the factors); LoRA Rank Table: what each choice of ranks would keep."""
from __future__ import annotations

from merge_core.merge.rank_table import rank_table, table_lines

from .inputs import CATEGORY, device_input, dora_input, rank_inputs, seed_input, target_size_input
from .merge import run_merge
from .pack_lora import LORA_TYPE, PackLora
from .runtime import run_job, torch_device

METHODS = ("svd", "rsvd")
METHOD_TOOLTIP = ("svd: exact truncated SVD of ΔW computed from the factors (QR core); rsvd: seeded randomized "
                  "SVD (exact Gram core at small ranks), faster on inputs of very high rank")
BLOCK_WEIGHTS_TOOLTIP = ("optional block weights baked into the result before resizing: SDXL 20 or 12 values, Flux.1 "
                         "58, or BLOCK=VALUE pairs with the rest at 1 (OUT=0.5, S20-S37=0); empty = none")


class ResizeLora:
    NODE_ID = "LoRArSVD_Resize"
    DISPLAY_NAME = "Resize LoRA (rSVD Merge)"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Resizes one LoRA, LoCon, LoHa or LoKr to a LoRA of new ranks: per module the best rank-k "
                   "approximation of its ΔW (truncated SVD from the factors, no dense matrix). The rank is fixed, "
                   "or the smallest keeping `energy` of ‖ΔW‖² within [min_rank, max_rank], or chosen by a file "
                   "size budget. LoHa/LoKr inputs come out as plain LoRAs. Optional block weights are baked in first.")
    RETURN_TYPES = (LORA_TYPE,)
    RETURN_NAMES = ("lora",)
    OUTPUT_TOOLTIPS = ("the resized LoRA, with its per-module report",)
    FUNCTION = "resize"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"lora": (LORA_TYPE, {"tooltip": "the LoRA to resize"}),
                             "method": (list(METHODS), {"default": METHODS[0], "tooltip": METHOD_TOOLTIP}),
                             **rank_inputs(), **seed_input(), **device_input(), **dora_input()},
                "optional": {**target_size_input(),
                             "block_weights": ("STRING", {"default": "", "tooltip": BLOCK_WEIGHTS_TOOLTIP})}}

    def resize(self, lora: PackLora, method: str, rank: int, energy: float, min_rank: int, max_rank: int, seed: int,
               device: str, dora: str, target_size_mb: float = 0.0, block_weights: str = "") -> dict:
        return run_merge(method, {"lora_1": lora, "weight_1": 1.0}, rank, energy, min_rank, max_rank, seed, device,
                         dora, block_weights=block_weights.strip(), target_size_mb=target_size_mb, label="resize")


class RankTable:
    NODE_ID = "LoRArSVD_RankTable"
    DISPLAY_NAME = "LoRA Rank Table (rSVD Merge)"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Shows what resizing a LoRA would keep, before you resize it: for energy levels 0.5-0.999 (with "
                   "min_rank 1) and fixed ranks, the ranks its modules would get, the share of ‖ΔW‖² kept and the "
                   "size of the fp16 file — from every module's exact singular values.")
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("text",)
    OUTPUT_TOOLTIPS = ("the table as text",)
    OUTPUT_NODE = True  # it runs on its own: the table is what it is for
    FUNCTION = "table"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"lora": (LORA_TYPE, {"tooltip": "the LoRA to size up"}), **device_input()}}

    def table(self, lora: PackLora, device: str) -> dict:
        rows = run_job(lambda progress: rank_table(lora.lora, title=lora.label, device=torch_device(device),
                                                   progress=progress))
        text = "\n".join([f"{lora.label}: what a resize would keep", *table_lines(rows)])
        return {"ui": {"text": [text]}, "result": (text,)}


NODES = (ResizeLora, RankTable)
