"""Bake a LoRA into a model: W' = W + s·ΔW for every module (LoRA, LoCon, LoHa, LoKr, .diff/.diff_b), and
DoRA's rescaled weight where a module has a magnitude (adapters/dora.py: as ComfyUI applies it, or as PEFT
merges it for a PEFT adapter), streaming one base tensor at a time into the output file, which keeps the
base's keys, order and metadata.

ΔW is each module's exact delta as ComfyUI applies it (module.delta(): α/r folded in, Tucker/LoKr rules);
s is the bake strength.  A module whose shape does not fit its base layer is reported and left out, never
written wrong.  Compute is fp32; output tensors keep the base's dtypes unless output_dtype is given.
"""
from __future__ import annotations

import json
import os
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Callable, Optional, Union

import torch

from ..adapters import AdapterModule, FullDiff
from ..adapters.base import finite_sum
from ..adapters.dora import dora_weight
from ..checkpoint.lora_names import BIAS, WEIGHT
from ..checkpoint.sources import (WeightSource, check_kind, checkpoint_digest, digest_placeholder, label_of,
                                  open_weights)
from ..device import COMPUTE_DTYPE, resolve_device, with_cpu_fallback
from ..errors import MergeCoreError, NonFiniteError, finite_numbers
from ..files.atomic import atomic_write, refuse_existing
from ..files.metadata import RECIPE_KEY, make_recipe
from ..files.narrow import narrowed
from ..files.stream_writer import header_bound, write_safetensors
from ..files.tensor_source import PICKLE_OUTPUTS
from ..lora_file import LoraSet, damaged_module_error, dtype_of, load_lora, save_pickle
from ..name_match import for_base
from ..report import Progress
from .index import BakeIndex, Slot

Patch = tuple[Slot, AdapterModule, str]


def roles_of(module: AdapterModule) -> list[str]:
    roles = [] if isinstance(module, FullDiff) and not module.has_weight else [WEIGHT]
    return roles + ([BIAS] if module.diff_b is not None else [])


def delta_of(module: AdapterModule, role: str) -> torch.Tensor:
    if role == BIAS:
        return module.diff_b
    return module.diff if isinstance(module, FullDiff) else module.delta()


def shape_of(module: AdapterModule, role: str) -> tuple[int, ...]:
    return tuple(module.diff_b.shape) if role == BIAS else tuple(module.weight_shape)


def fits(have: tuple[int, ...], want: tuple[int, ...]) -> bool:
    """Same shape, or the same matrix (out × rest) stored flat (e.g. a Linear delta for a 1×1 conv)."""
    if have == want:
        return True
    numel = torch.Size(have).numel()
    return numel == torch.Size(want).numel() and (not have or not want or have[0] == want[0])


def plan_patches(lset: LoraSet, index: BakeIndex) -> tuple[dict[str, list[Patch]], list[str], list[dict]]:
    """(base key -> patches, matched module names, skipped entries with reasons)."""
    patches: dict[str, list[Patch]] = {}
    matched, skipped = [], []
    for name, module in lset.modules.items():
        found = {role: index.slots_of(name, role) for role in roles_of(module)}
        if all(slots is None for slots in found.values()):
            skipped.append({"module": name, "role": "all", "reason": "no matching layer in the base model"})
            continue
        ok = False
        for role, slots in found.items():
            reason = _unfit(module, role, slots)
            if reason is not None:
                skipped.append({"module": name, "role": role, "reason": reason})
                continue
            for slot in slots:
                patches.setdefault(slot.key, []).append((slot, module, role))
            ok = True
        if ok:
            matched.append(name)
    return patches, matched, skipped


def _unfit(module: AdapterModule, role: str, slots: Optional[list[Slot]]) -> Optional[str]:
    """Why `module`'s `role` cannot patch `slots` (None: it can, all of them)."""
    if not slots:
        return f"the base layer has no {role}"
    have = shape_of(module, role)
    for slot in slots:
        if not fits(have, slot.module_shape):
            return f"shape mismatch: LoRA {have} vs base '{slot.key}' {slot.module_shape}"
        if slot.is_piece and role == WEIGHT and module.dora_scale is not None:
            return (f"DoRA's norm is over the whole fused weight; the base holds it in parts ('{slot.key}', …), "
                    "so the magnitude cannot be applied part by part")
    return None


def apply(tensor: torch.Tensor, patches: list[Patch], alpha: float, dev: torch.device,
          peft: bool = False) -> torch.Tensor:
    """W + alpha·ΔW in fp32 (row blocks / transposes via each slot's target), or DoRA's rescaled weight for a
    module with a magnitude (adapters/dora.py; PEFT's convention for a PEFT adapter, else ComfyUI's); in-memory
    bases are not modified."""
    W = tensor.to(dev, COMPUTE_DTYPE, copy=True)
    for slot, module, role in patches:
        d = slot.piece(delta_of(module, role).to(dev, COMPUTE_DTYPE)).reshape(slot.shape)
        view = slot.target.take(W)
        if role == WEIGHT and module.dora_scale is not None:
            view.copy_(dora_weight(view, d, module.dora_scale.to(dev, COMPUTE_DTYPE), alpha, peft))
        else:
            view.add_(d, alpha=alpha)
    return W.to("cpu")


def _open_lora(lora: Union[LoraSet, str, os.PathLike], kind: str) -> LoraSet:
    if isinstance(lora, LoraSet):
        return lora
    path = Path(lora)
    if not path.is_dir():
        check_kind(path, kind, "--lora-type")
    return load_lora(path)


def baked_tensors(base: WeightSource, patches: dict[str, list[Patch]], alpha: float,
                  out_dtype: Optional[torch.dtype], dev: torch.device, progress: Progress = None, peft: bool = False):
    """(key, tensor) of the output in the base's order, one base tensor read and patched at a time (`peft`: the
    LoRA is a PEFT adapter, for DoRA's convention)."""
    keys = base.keys()
    for done, key in enumerate(keys, 1):
        t = base.get(key)
        dtype = out_dtype if out_dtype is not None and t.is_floating_point() else t.dtype
        if key in patches:
            if not t.is_floating_point():
                raise MergeCoreError(f"base tensor '{key}' is {t.dtype}, cannot add a LoRA delta to it")
            t = with_cpu_fallback(lambda d, t=t, key=key: apply(t, patches[key], alpha, d, peft), dev)
        what = f"base tensor '{key}'" + (f" patched at strength {alpha:g}" if key in patches else "")
        t = narrowed(t, dtype, what)  # a finite value beyond the output dtype, patched or not
        if key in patches and not finite_sum(t):  # finite inputs (checked): the strength took it beyond fp32
            raise NonFiniteError(f"{what} holds values beyond float32's range; nothing was written")
        yield key, t
        if progress is not None:
            progress(done, len(keys), key)


def write_checkpoint(path: Path, base: WeightSource, tensors, metadata: Callable[[Optional[str]], dict],
                     base_digest: "Future[Optional[str]]", overwrite: bool) -> None:
    """.safetensors streamed (header reserved from the base's shapes; `metadata(base's sha256)` written last,
    once the background hash is in), .pt/.pth/.ckpt through torch.save.  The base's files are closed before the
    rename: Windows cannot replace an open file (a bake onto its own base)."""
    pickled = path.suffix.lower() in PICKLE_OUTPUTS
    if not pickled:  # dtypes arrive with the tensors: size every entry as 8-byte elements, +1 byte per dtype name
        entries = [(k, torch.float64, tuple(base.shape(k))) for k in base.keys()]
        reserve = header_bound(entries, metadata(digest_placeholder(base_digest)), slack=len(entries) + 4096)

    def write(tmp: Path) -> None:
        if pickled:
            save_pickle(dict(tensors), tmp)
        else:
            write_safetensors(tmp, tensors, reserve, lambda: metadata(base_digest.result()))
        if hasattr(base, "close"):
            base.close()

    atomic_write(path, write, overwrite)


def bake_lora(base_path: Union[str, os.PathLike, WeightSource], lora: Union[LoraSet, str, os.PathLike],
              output: Union[str, os.PathLike], alpha: float = 1.0, output_dtype: Optional[str] = None,
              overwrite: bool = False, device: str = "auto", progress: Progress = None, base_kind: str = "auto",
              lora_kind: str = "auto") -> dict:
    """Write base + alpha·ΔW to `output` (.safetensors streamed; .pt/.pth/.ckpt via torch.save); returns the report."""
    began = time.perf_counter()
    alpha = finite_numbers([alpha], "the bake strength")[0]
    path = Path(output)
    refuse_existing(path, overwrite, (base_path, lora))  # fail before reading anything
    base = open_weights(base_path, base_kind, "--source-model")
    lset = _open_lora(lora, lora_kind)
    damaged = next((name for name, m in lset.modules.items() if not m.is_finite()), None)
    if damaged is not None:  # one fp32 sum per tensor: a NaN baked in would ruin the whole layer
        raise damaged_module_error(damaged, lset, 0)
    out_dtype = dtype_of(output_dtype) if output_dtype else None
    index = BakeIndex(base)
    lset = for_base(lset, index.rows())
    patches, matched, skipped = plan_patches(lset, index)
    base_label = label_of(base_path, "base (in memory)")
    if not patches:
        raise MergeCoreError(f"nothing to bake: none of the {len(lset.modules)} modules of {lset.source or 'the LoRA'} "
                             f"matches a layer of {base_label} "
                             f"(e.g. '{skipped[0]['module']}': {skipped[0]['reason']})")
    base_digest = checkpoint_digest(base_path)  # hashed beside the bake

    def metadata(base_sha256: Optional[str]) -> dict:
        recipe = make_recipe("bake", [base_label, lset.source or "lora (in memory)"],
                             {"alpha": alpha, "output_dtype": output_dtype}, digests=[base_sha256, lset.sha256()])
        return {**getattr(base, "metadata", {}), RECIPE_KEY: json.dumps(recipe, sort_keys=True)}

    tensors = baked_tensors(base, patches, alpha, out_dtype, resolve_device(device), progress, lset.profile == "peft")
    write_checkpoint(path, base, tensors, metadata, base_digest, overwrite)
    return {"operation": "bake", "base": str(base_label), "lora": str(lset.source), "output": str(path),
            "alpha": alpha, "output_dtype": output_dtype or "as base", "base_keys": len(base.keys()),
            "patched_keys": len(patches), "matched": matched, "dora_modules": len(lset.dora_modules()),
            "skipped": skipped,
            "seconds": time.perf_counter() - began}
