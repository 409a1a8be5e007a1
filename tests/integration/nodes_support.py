"""Support for the node-pack tests: the pack imported as ComfyUI imports it, small synthetic SDXL files
(real names and shapes from merge_core's SDXL table, a subset of layers), dense references computed here,
and real ComfyUI SDXL ModelPatcher / CLIP objects with only a handful of weights materialised."""
from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path
from typing import Iterable, Optional

import torch
from safetensors.torch import save_file

from comfy_host import SDXL_UNET_CONFIG, import_comfy
from comfy_host.runner import REPO_ROOT
from merge_core.keys.sdxl_table import ModuleSpec, sdxl_modules

# ComfyUI names a pack's module after its path (any string); a name that is no identifier proves the pack
# imports only relatively.
PACK_MODULE = "custom_nodes/lora-rsvd-merge"
NOT_LOADED = "lora key not loaded: "

# Modules of real SDXL names and shapes in IN04/IN05/IN07/IN08/MID/OUT00/OUT03/OUT05, both text encoders,
# and a LoCon 3×3 conv (none of the 6.5M-entry feed-forward layers: TIES/DARE work on dense deltas).
MODULE_NAMES = (
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
    "lora_unet_input_blocks_5_1_transformer_blocks_1_attn2_to_k",
    "lora_unet_input_blocks_7_1_proj_in",
    "lora_unet_input_blocks_8_1_transformer_blocks_3_attn1_to_out_0",
    "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_v",
    "lora_unet_output_blocks_0_1_transformer_blocks_9_attn1_to_k",
    "lora_unet_output_blocks_3_1_transformer_blocks_0_attn1_to_k",
    "lora_unet_output_blocks_5_1_proj_out",
    "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
    "lora_te2_text_model_encoder_layers_5_self_attn_q_proj",
)
CONV_NAME = "lora_unet_input_blocks_1_0_in_layers_2"


def specs(names: Iterable[str] = MODULE_NAMES) -> list[ModuleSpec]:
    table = sdxl_modules()
    return [table[n] for n in names]


def import_pack():
    """The repo root imported as ComfyUI imports a custom node folder (by path, under a path-like name)."""
    import_comfy()
    if PACK_MODULE not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACK_MODULE, REPO_ROOT / "__init__.py",
                                                      submodule_search_locations=[str(REPO_ROOT)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACK_MODULE] = module
        spec.loader.exec_module(module)
    return sys.modules[PACK_MODULE]


def node(node_id: str):
    """An instance of one of the pack's node classes."""
    return import_pack().NODE_CLASS_MAPPINGS[node_id]()


# ----------------------------------------------------------------- synthetic LoRA files (kohya names)

def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def lora_tensors(module_specs: Iterable[ModuleSpec], rank: int, seed: int, alpha: Optional[float] = None,
                 scale: float = 0.05) -> dict[str, torch.Tensor]:
    """kohya LoRA/LoCon tensors: up [out, r(,1,1)], down [r, in(, kh, kw)], alpha (default: rank/2)."""
    g, out = _gen(seed), {}
    for s in module_specs:
        o, i = s.shape[0], s.shape[1]
        tail = tuple(s.shape[2:])
        out[f"{s.name}.lora_up.weight"] = torch.randn(o, rank, *([1] * len(tail)), generator=g) * scale
        out[f"{s.name}.lora_down.weight"] = torch.randn(rank, i, *tail, generator=g) * scale
        out[f"{s.name}.alpha"] = torch.tensor(float(alpha if alpha is not None else rank / 2))
    return out


def loha_tensors(module_specs: Iterable[ModuleSpec], rank: int, seed: int) -> dict[str, torch.Tensor]:
    g, out = _gen(seed), {}
    for s in module_specs:
        o, i = s.shape[0], s.shape[1]
        out.update({f"{s.name}.hada_w1_a": torch.randn(o, rank, generator=g) * 0.1,
                    f"{s.name}.hada_w1_b": torch.randn(rank, i, generator=g) * 0.1,
                    f"{s.name}.hada_w2_a": torch.randn(o, rank, generator=g) * 0.1,
                    f"{s.name}.hada_w2_b": torch.randn(rank, i, generator=g) * 0.1,
                    f"{s.name}.alpha": torch.tensor(float(rank))})
    return out


def lokr_tensors(module_specs: Iterable[ModuleSpec], seed: int, factor: int = 8, rank: int = 2
                 ) -> dict[str, torch.Tensor]:
    """LoKr as trainers write it: full lokr_w1 [f, f], lokr_w2 = w2_a [out/f, r] @ w2_b [r, in/f], α = r."""
    g, out = _gen(seed), {}
    for s in module_specs:
        o, i = s.shape[0], s.shape[1]
        out.update({f"{s.name}.lokr_w1": torch.randn(factor, factor, generator=g) * 0.3,
                    f"{s.name}.lokr_w2_a": torch.randn(o // factor, rank, generator=g) * 0.1,
                    f"{s.name}.lokr_w2_b": torch.randn(rank, i // factor, generator=g) * 0.1,
                    f"{s.name}.alpha": torch.tensor(float(rank))})
    return out


def write(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def dense_delta(tensors: dict[str, torch.Tensor], name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """ΔW of one module from raw file tensors, written out here (LoRA α/r·up·down, LoHa, full LoKr, diff)."""
    t = {k[len(name) + 1:]: v.float() for k, v in tensors.items() if k.startswith(name + ".")}
    if "diff" in t:
        return t["diff"].reshape(shape)
    if "lora_up.weight" in t:
        up, down = t["lora_up.weight"].flatten(1), t["lora_down.weight"].flatten(1)
        scale = t["alpha"].item() / down.shape[0] if "alpha" in t else 1.0
        return (scale * up @ down).reshape(shape)
    if "hada_w1_a" in t:
        r = t["hada_w1_b"].shape[0]
        return (t["alpha"].item() / r * (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])
                ).reshape(shape)
    w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
    if "lokr_w2" in t:
        return torch.kron(w1, t["lokr_w2"]).reshape(shape)  # both full: scale 1
    scale = t["alpha"].item() / t["lokr_w2_b"].shape[0] if "alpha" in t else 1.0
    return (scale * torch.kron(w1, t["lokr_w2_a"] @ t["lokr_w2_b"])).reshape(shape)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# ------------------------------------------------------------ synthetic SDXL checkpoints (original layout)

def checkpoint_key(spec: ModuleSpec) -> str:
    """The original SDXL checkpoint key of a UNet or CLIP-L module's weight."""
    if spec.group == "unet":
        return "model." + spec.key
    if spec.group == "te1":
        return "conditioner.embedders.0.transformer." + spec.key[len("clip_l.transformer."):]
    raise ValueError(f"{spec.name}: OpenCLIP-G keys are not written by this helper")


VAE_KEY = "first_stage_model.decoder.conv_in.weight"


def checkpoint_pair(module_specs: list[ModuleSpec], rank: int, seed: int) -> tuple[dict, dict]:
    """(base, tuned) SDXL-layout state dicts (fp32): tuned = base + a rank-`rank` delta per module; a VAE
    tensor that stays the same."""
    g = _gen(seed)
    base, tuned = {}, {}
    for s in module_specs:
        key = checkpoint_key(s)
        w = torch.randn(*s.shape, generator=g) * 0.02
        o, n = s.shape[0], s.matrix_shape[1]
        d = (torch.randn(o, rank, generator=g) @ torch.randn(rank, n, generator=g) * 0.01).reshape(s.shape)
        base[key], tuned[key] = w, w + d
    vae = torch.randn(512, 4, 3, 3, generator=g)
    base[VAE_KEY], tuned[VAE_KEY] = vae, vae.clone()
    return base, tuned


# ------------------------------------------------------- in-process SDXL ModelPatcher and CLIP objects

def sdxl_objects(keep: Optional[set[str]] = None, seed: int = 0, weights: Optional[dict] = None):
    """(ModelPatcher, CLIP) of ComfyUI's real SDXL classes on the meta device (no memory for weights).

    With `keep` (ComfyUI state-dict keys: diffusion_model.*, clip_l.*, clip_g.*) every other parameter and
    buffer is dropped from the modules and the kept ones get real random fp32 values (or `weights[key]`), so
    patching, extracting and reading work on those keys only.  Without `keep` everything stays on meta:
    enough for key maps and add_patches (which only look at keys)."""
    import_comfy()
    import comfy.model_detection
    import comfy.model_patcher
    import comfy.sd

    meta, cpu = torch.device("meta"), torch.device("cpu")
    config = comfy.model_detection.model_config_from_unet_config(dict(SDXL_UNET_CONFIG, dtype=torch.float32))
    model = config.get_model({}, device=meta)
    clip = comfy.sd.CLIP(config.clip_target(state_dict={}), model_options={
        "initial_device": meta, "load_device": cpu, "offload_device": cpu, "dtype": torch.float32})
    if keep is not None:
        g = _gen(seed)
        _materialise(model, keep, g, weights or {})
        _materialise(clip.cond_stage_model, keep, g, weights or {})
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)
    return patcher, clip


def _materialise(root: torch.nn.Module, keep: set[str], g: torch.Generator, weights: dict) -> None:
    for module_name, module in root.named_modules():
        prefix = module_name + "." if module_name else ""
        for store in (module._parameters, module._buffers):
            for name, tensor in list(store.items()):
                if tensor is None:
                    continue
                key = prefix + name
                if key not in keep:
                    store[name] = None
                    continue
                value = weights.get(key)
                value = value.clone() if value is not None else torch.randn(*tensor.shape, generator=g) * 0.02
                store[name] = torch.nn.Parameter(value, requires_grad=False) if store is module._parameters \
                    else value


def patched_weight(patcher, key: str) -> torch.Tensor:
    """The weight ComfyUI computes for `key` when it loads `patcher` (its clean weight + its own patches)."""
    import comfy.lora

    (weight, convert), *patches = patcher.get_key_patches()[key]
    w = convert(weight.to(torch.float32, copy=True), inplace=True)
    return comfy.lora.calculate_weight(patches, w, key) if patches else w


class NotLoadedLog(logging.Handler):
    """Collects ComfyUI's "lora key not loaded" warnings while active (a context manager)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.keys: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if msg.startswith(NOT_LOADED):
            self.keys.append(msg[len(NOT_LOADED):])

    def __enter__(self) -> "NotLoadedLog":
        logging.getLogger().addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        logging.getLogger().removeHandler(self)
