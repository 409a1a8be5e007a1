"""What merge, fuse and extract return: the new modules, their report, and how to write them."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

from .adapters import AdapterModule
from .keys.suffixes import Suffixes
from .lora_file import save_lora
from .report import Report


@dataclass
class MergeResult:
    modules: dict[str, AdapterModule]
    report: Report
    arch: str = "sdxl"  # sdxl | sd15 | other
    profile: str = "sdxl"  # naming to write: sdxl/kohya names, peft folder, custom suffixes
    peft_config: Optional[dict] = None
    suffixes: Optional[Suffixes] = None
    recipe: dict = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)  # kept from the inputs (trigger words, tags)
    peft_embeddings: frozenset[str] = frozenset()  # modules written as PEFT LoRAs on an nn.Embedding

    def save(self, path: Union[str, os.PathLike], dtype: str = "fp16", overwrite: bool = False,
             recipe: Optional[dict] = None) -> Path:
        return save_lora(self.modules, path, arch=self.arch, profile=self.profile, dtype=dtype, overwrite=overwrite,
                         recipe=recipe or self.recipe or None, suffixes=self.suffixes, peft_config=self.peft_config,
                         carried=self.metadata, peft_embeddings=self.peft_embeddings)
