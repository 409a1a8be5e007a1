"""LoKr/LoHa Fuse: fuse LyCORIS (and LoRA/full) inputs module by module on their exact deltas."""
from __future__ import annotations

from merge_core.fuse import DEFAULT_RULE, OUTPUT_FORMATS, STRATEGIES, fuse_models

from .inputs import CATEGORY, connected_loras, device_input, dora_input, lora_slots, rank_inputs, rank_rule
from .pack_lora import LORA_TYPE, PackLora, summary_line
from .runtime import run_job, torch_device

STRATEGY_TOOLTIP = ("weighted_sum: Σ wᵢΔWᵢ; weighted_average: Σ wᵢΔWᵢ / Σ wᵢ; layer_adaptive: wᵢ scaled by the "
                    "inverse variance of ΔWᵢ relative to the others; smart_fusion: wᵢ scaled by ‖ΔWᵢ‖ relative to "
                    "the others; min_max_norm: Σ wᵢΔWᵢ scaled so max|ΔW| ≤ norm_threshold × the largest input's")
FORMAT_TOOLTIP = ("auto: lokr where the nearest Kronecker product keeps ≥ 99.9 % of the energy, else lora; "
                  "lokr: nearest Kronecker product; lora: low-rank under the rank rule; full: exact dense diff")


class FuseLycoris:
    NODE_ID = "LoRArSVD_Fuse"
    DISPLAY_NAME = "Fuse LoKr/LoHa (rSVD Merge)"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Fuses LoKr / LoHa / LoRA / full-diff inputs into one on the exact deltas: per module "
                   "T = Σ cᵢ ΔWᵢ with cᵢ from the strategy, written as LoKr (nearest Kronecker product), LoRA or "
                   "full diff.")
    RETURN_TYPES = (LORA_TYPE,)
    RETURN_NAMES = ("lora",)
    OUTPUT_TOOLTIPS = ("the fused LoRA, with its per-module report",)
    FUNCTION = "fuse"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        required, optional = lora_slots(weight_tooltip="weight of this input (strength, as in LoraLoader)")
        required.update({
            "strategy": (list(STRATEGIES), {"default": "smart_fusion", "tooltip": STRATEGY_TOOLTIP}),
            "norm_threshold": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 100.0, "step": 0.01,
                                         "tooltip": "min_max_norm's threshold τ"}),
            "output_format": (list(OUTPUT_FORMATS), {"default": "auto", "tooltip": FORMAT_TOOLTIP}),
            **rank_inputs(DEFAULT_RULE.energy, DEFAULT_RULE.min_rank, DEFAULT_RULE.max_rank),
            **device_input(),
            **dora_input(),
        })
        return {"required": required, "optional": optional}

    def fuse(self, strategy: str, norm_threshold: float, output_format: str, rank: int, energy: float,
             min_rank: int, max_rank: int, device: str, dora: str, **slots) -> dict:
        inputs = connected_loras(slots)
        rule = rank_rule(rank, energy, min_rank, max_rank)
        result = run_job(lambda progress: fuse_models(
            [lora.lora for _, lora, _ in inputs], weights=[w for _, _, w in inputs], strategy=strategy,
            norm_threshold=norm_threshold, output_format=output_format, rule=rule, device=torch_device(device),
            dora=dora, progress=progress))
        pack = PackLora.from_result(result, f"fuse ({strategy}, {output_format})")
        return {"ui": {"text": [summary_line(result.report)]}, "result": (pack,)}


NODES = (FuseLycoris,)
