"""Which tensor pairs an extraction reads and where each delta goes, decided from the headers alone.

Keys in both models with equal shapes and at least one LoRA target ComfyUI loads become tasks; everything
else is recorded under a reason (only in one model, shape mismatch, scalar, no LoRA target, no name ComfyUI
places, text encoder left out, duplicate name), so the report can say what was not extracted and why.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..checkpoint.layout import UNET, source_layout
from ..checkpoint.lora_names import GENERIC, Target, targets_of
from ..checkpoint.sources import WeightSource
from ..keys.sdxl_table import sdxl_modules
from ..adapters.base import matrix_shape


@dataclass(frozen=True)
class Task:
    key: str
    shape: tuple[int, ...]
    targets: tuple[Target, ...]


@dataclass
class Plan:
    tasks: list[Task]
    skipped: dict[str, list[str]] = field(default_factory=dict)
    arch: str = "other"

    def skip(self, reason: str, key: str) -> None:
        self.skipped.setdefault(reason, []).append(key)


def detect_arch(tasks: list[Task]) -> str:
    """sdxl when any target is an SDXL table module at its SDXL shape (or OpenCLIP-G), sd15 when the
    single SD1.x text encoder is present, else other."""
    table = sdxl_modules()
    groups = {t.group for task in tasks for t in task.targets}
    for task in tasks:
        for t in task.targets:
            spec = table.get(t.name)
            if spec is not None and t.role == "weight" and \
                    matrix_shape(t.part_shape(task.shape)) == spec.matrix_shape:
                return "sdxl"
    if "te2" in groups:
        return "sdxl"
    return "sd15" if "te" in groups else "other"


def make_plan(base: WeightSource, tuned: WeightSource, text_encoders: bool = True) -> Plan:
    base_keys = base.keys()
    tuned_keys = set(tuned.keys())
    checkpoint, prefix = source_layout(base_keys)
    plan = Plan([])
    seen: set[tuple[str, str]] = set()
    for key in base_keys:
        if key not in tuned_keys:
            plan.skip("only_in_base", key)
            continue
        shape = tuple(base.shape(key))
        if tuple(tuned.shape(key)) != shape:
            plan.skip("shape_mismatch", key)
            continue
        if not shape:  # a LoRA file cannot hold scalar parameters (merge_core's readers need a matrix)
            plan.skip("scalar", key)
            continue
        targets = targets_of(key, shape, checkpoint, prefix)
        if not targets:
            plan.skip("no_lora_target", key)
            continue
        targets = [t for t in targets if t.loadable]
        if not targets:  # e.g. the bias of q in a diffusers-format Flux: ComfyUI has no name that places it
            plan.skip("no_comfyui_name", key)
            continue
        if not text_encoders and all(t.group not in (UNET, GENERIC) for t in targets):
            plan.skip("text_encoder", key)
            continue
        if any((t.name, t.role) in seen for t in targets):
            plan.skip("duplicate_name", key)
            continue
        seen.update((t.name, t.role) for t in targets)
        plan.tasks.append(Task(key, shape, tuple(targets)))
    base_set = set(base_keys)
    for key in tuned.keys():
        if key not in base_set:
            plan.skip("only_in_tuned", key)
    plan.arch = detect_arch(plan.tasks)
    return plan
