"""Which tensor pairs an extraction reads and where each delta goes, decided from the headers alone.

Keys in both models with equal shapes and at least one LoRA target ComfyUI loads become tasks; everything
else is recorded under a reason (only in one model, shape mismatch, scalar, no LoRA target, no name ComfyUI
places, text encoder left out, duplicate name), so the report can say what was not extracted and why.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..checkpoint.layout import FLUX_DIFFUSERS, UNET, Placement, source_layout
from ..checkpoint.lora_names import BIAS, GENERIC, Target, split_role, targets_of
from ..checkpoint.sources import WeightSource
from ..keys.diffusers_tables import Place
from ..keys.flux_names import flux_place
from ..keys.sdxl_table import sdxl_modules
from ..adapters.base import matrix_shape


@dataclass(frozen=True)
class Task:
    """One delta to extract: of tensor `key`, or of the tensors `parts` stacked (rows of a fused weight the
    checkpoint holds apart), its two row halves swapped when `swap`; `key` then names them in messages."""

    key: str
    shape: tuple[int, ...]
    targets: tuple[Target, ...]
    parts: tuple[str, ...] = ()
    swap: bool = False

    @property
    def keys(self) -> tuple[str, ...]:
        return self.parts or (self.key,)


@dataclass
class Plan:
    tasks: list[Task]
    skipped: dict[str, list[str]] = field(default_factory=dict)
    arch: str = "other"

    def skip(self, reason: str, key: str) -> None:
        self.skipped.setdefault(reason, []).append(key)


class FusedBiases:
    """The biases a diffusers-format Flux holds in parts of what ComfyUI's model fuses (q, k, v and proj_mlp of
    one weight; norm_out's halves swapped), which no name places apart: gathered, each fused bias becomes one
    `.diff_b` under the fused weight's kohya name (`lora_unet_double_blocks_0_img_attn_qkv`), which ComfyUI loads."""

    def __init__(self) -> None:
        self.parts: dict[str, dict[int, tuple[str, tuple[int, ...]]]] = {}  # kohya name -> part -> key, shape
        self.swapped: dict[str, tuple[str, tuple[int, ...]]] = {}

    def add(self, key: str, shape: tuple[int, ...]) -> None:
        place = flux_place(FLUX_DIFFUSERS + split_role(key)[0])
        if place is not None and place.part is not None:
            self.parts.setdefault(place.name, {})[place.part] = (key, shape)
        elif place is not None:
            self.swapped[place.name] = (key, shape)

    def tasks(self, plan: Plan) -> list[Task]:
        """One task per fused bias whose parts are all here; the parts of any other skipped (no_comfyui_name)."""
        out = []
        for name, found in self.parts.items():
            keys = [found[i][0] for i in sorted(found)]
            if len(found) < Place(name).parts:
                for key in keys:
                    plan.skip("no_comfyui_name", key)
                continue
            rows = sum(found[i][1][0] for i in found)
            out.append(Task("+".join(keys), (rows,), (_bias_target(name, keys[0]),), parts=tuple(keys)))
        for name, (key, shape) in self.swapped.items():
            out.append(Task(key, shape, (_bias_target(name, key),), swap=True))
        return out


def _bias_target(name: str, key: str) -> Target:
    return Target(name, BIAS, Placement(FLUX_DIFFUSERS + key, UNET))


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
    fused = FusedBiases()
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
        if not targets and prefix == FLUX_DIFFUSERS:  # the bias of q: ComfyUI has no name for it alone
            fused.add(key, shape)
            continue
        if not targets:
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
    plan.tasks += fused.tasks(plan)  # under kohya names, which no `transformer.` target above has
    base_set = set(base_keys)
    for key in tuned.keys():
        if key not in base_set:
            plan.skip("only_in_tuned", key)
    plan.arch = detect_arch(plan.tasks)
    return plan
