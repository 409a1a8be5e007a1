"""Extract a LoRA from two models (base and fine-tuned) by randomized SVD of each layer's delta, streaming.

`extract_lora(base, tuned, ...) -> MergeResult` (in memory; what the ComfyUI node calls with clean model
weights as a DictSource), `extract_to_file(...)` (the CLI: streamed into the output file).
"""
from ..checkpoint.sources import DictSource, WeightSource
from .api import extract_lora
from .options import DEFAULT_RANK, ExtractOptions
from .to_file import extract_to_file

__all__ = ["extract_lora", "extract_to_file", "ExtractOptions", "DEFAULT_RANK", "DictSource", "WeightSource"]
