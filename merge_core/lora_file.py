"""Read any common LoRA/LyCORIS file into one data model (a LoraSet), and write one back.

Reads: kohya/LyCORIS `.safetensors`, diffusers and PEFT names, PEFT folders (adapter_model.safetensors +
adapter_config.json), `.pt/.pth/.ckpt` (weights_only).  Writes: kohya names (SDXL and kohya profiles),
the PEFT folder layout, or custom suffixes; atomically and never over an existing file unless asked.
PEFT's own conventions (config α, embeddings, lora_bias, the folder) live in peft_layout.py.
"""
from __future__ import annotations

import json
import os
import re
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import torch

from . import peft_layout
from .adapters import AdapterModule, module_from_roles, parameter_count
from .errors import DoraError, FormatError, MergeCoreError, NonFiniteError
from .files.atomic import atomic_write
from .files.digests import sha256_later
from .files.metadata import lora_metadata
from .files.narrow import narrowed
from .files.stream_writer import header_bound, write_safetensors
from .files.tensor_source import PICKLE_OUTPUTS, TensorSource
from .keys.blocks import BLOCKS_12, block_runs, blocks_held
from .keys.flux_names import FLUX_NAMING, flux_naming
from .keys.zimage_names import ZIMAGE_NAMING, zimage_naming
from .keys.profiles import Naming, resolve
from .keys.sdxl_table import sdxl_modules
from .keys.suffixes import ALPHA, DOWN, KOHYA, PEFT_BIAS, PEFT_EMBEDDING_B, UP, Suffixes, group_keys, style_of

PathLike = Union[str, os.PathLike]
DTYPES = {"fp16": torch.float16, "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp32": torch.float32, "float32": torch.float32}


@dataclass
class LoraSet:
    """Modules by canonical name (kohya names for SDXL), with how the file named them."""

    modules: dict[str, AdapterModule]
    naming: Naming
    metadata: dict[str, str] = field(default_factory=dict)
    source: Optional[Path] = None
    peft_config: Optional[dict] = None
    digest: Optional[Future] = field(default=None, repr=False, compare=False)  # sha256 of source, in the background
    peft_embeddings: frozenset[str] = frozenset()  # modules that were PEFT LoRAs on an nn.Embedding

    def start_digest(self) -> None:
        """Begin hashing the source for the recipe, on the background hasher (once)."""
        if self.digest is None:
            self.digest = sha256_later(self.source)

    def sha256(self) -> Optional[str]:
        """The source's sha256 (None when it is not a file on disk); waits for the background hash."""
        self.start_digest()
        return self.digest.result()

    @property
    def arch(self) -> str:
        return self.naming.arch

    @property
    def profile(self) -> str:
        return self.naming.profile

    def kinds(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for m in self.modules.values():
            out[m.kind] = out.get(m.kind, 0) + 1
        return out

    def dora_modules(self) -> list[str]:
        return [n for n, m in self.modules.items() if m.dora_scale is not None]

    def require_no_dora(self, what: str) -> None:
        """DoRA rescales W₀+ΔW column-wise by a learnt magnitude: not a linear delta, so refuse."""
        dora = self.dora_modules()
        if dora:
            raise DoraError(f"{self.source or 'input'} is a DoRA file ({len(dora)} modules with a DoRA magnitude "
                            f"(dora_scale / PEFT lora_magnitude_vector), e.g. "
                            f"'{dora[0]}'); DoRA cannot be {what} linearly — pass --dora ignore to use the "
                            "low-rank part without its magnitude rescaling")

    def drop_dora(self) -> None:
        for m in self.modules.values():
            m.dora_scale = None


def input_label(s: LoraSet, index: int) -> str:
    """How messages and recipes name the `index`-th input of an operation: its path, or "input N"."""
    return str(s.source) if s.source is not None else f"input {index + 1}"


def damaged_module_error(name: str, s: LoraSet, index: int) -> NonFiniteError:
    """The error for module `name` of the `index`-th input holding NaN/inf values."""
    return NonFiniteError(f"module '{name}' of {input_label(s, index)} holds NaN or infinite values (a damaged file, "
                          "e.g. an fp16 overflow in training); nothing was written")


DORA_CHOICES = ("error", "ignore")


def check_dora(sets, dora: str, what: str) -> None:
    """The DoRA policy of an operation on several sets: `error` refuses DoRA files, `ignore` uses their
    low-rank part without the magnitude rescaling."""
    if dora not in DORA_CHOICES:
        raise MergeCoreError(f"unknown dora policy {dora!r}; choose one of {', '.join(DORA_CHOICES)}")
    if dora == "error":
        for s in sets:
            s.require_no_dora(what)


def dtype_of(name: Union[str, torch.dtype]) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name]
    except KeyError:
        raise MergeCoreError(f"unknown dtype {name!r}; choose fp16, bf16 or fp32") from None


# ---------------------------------------------------------------- reading

def _open(path: Path) -> tuple[TensorSource, Optional[dict]]:
    if path.is_dir() and (path / peft_layout.CONFIG).exists():
        weights = next((path / w for w in peft_layout.WEIGHTS if (path / w).exists()), None)
        if weights is None:
            raise FormatError(f"PEFT folder has {peft_layout.CONFIG} but no adapter_model.safetensors: {path}")
        try:
            config = json.loads((path / peft_layout.CONFIG).read_text())
        except ValueError as exc:
            raise FormatError(f"corrupt {peft_layout.CONFIG} in {path}: {exc}") from None
        return TensorSource(weights), peft_layout.checked_config(config, path)
    return TensorSource(path), None


def load_lora(path: PathLike, profile: str = "auto", suffixes: Optional[Suffixes] = None,
              digest: bool = False) -> LoraSet:
    """Read a LoRA/LyCORIS file or PEFT folder; modules keyed by canonical name.  digest: start hashing the
    file for a recipe now, beside the parsing (LoraSet.sha256() reads it)."""
    path = Path(path)
    pending = sha256_later(path) if digest else None
    src, config = _open(path)
    lset = lora_set_from(src, path, profile, suffixes, config)
    lset.digest = pending
    return lset


def _unknown_keys_error(path: Optional[Path], unknown: list[str], total: int, config: Optional[dict]) -> FormatError:
    """Unrecognised keys; PEFT's modules_to_save (whole trained copies of layers, not deltas) named as such."""
    saved = [m for m in (config or {}).get("modules_to_save") or [] if isinstance(m, str)]
    copies = [k for k in unknown if any(re.search(rf"(^|\.){re.escape(m)}\.(weight|bias)$", k) for m in saved)]
    if copies:
        return FormatError(f"{path} holds whole trained layers, not deltas: '{copies[0]}' (adapter_config.json "
                           f"modules_to_save: {', '.join(saved)}); this pack works on adapter deltas only — use "
                           "adapters trained without modules_to_save, or merge the adapter into its model first")
    return FormatError(f"unknown key layout in {path}: '{unknown[0]}' is not a LoRA/LoHa/LoKr/diff tensor "
                       f"({len(unknown)} of {total} keys unrecognised)")


def lora_set_from(src, path: Optional[Path], profile: str = "auto", suffixes: Optional[Suffixes] = None,
                  config: Optional[dict] = None) -> LoraSet:
    """A LoraSet from a tensor source with keys()/get(key)/len()/metadata: a file's, or tensors in memory
    (the ComfyUI LORA_MODEL converter); `path` names the source in errors."""
    if len(src) == 0:
        raise FormatError(f"no tensors in {path}")
    groups, unknown = group_keys(src.keys(), suffixes)
    if unknown:
        raise _unknown_keys_error(path, unknown, len(src), config)
    tensors = dict(src.items())  # one pass, one file handle: adapters are small
    modules: dict[str, AdapterModule] = {}
    embeddings = {prefix for prefix, roles in groups.items() if roles.get(UP, "").endswith(PEFT_EMBEDDING_B)}
    for prefix, roles in groups.items():
        bias_key = roles.pop(PEFT_BIAS, None)
        module = module_from_roles(prefix, {role: tensors[key] for role, key in roles.items()})
        modules[prefix] = peft_layout.read_conventions(prefix, module, tensors.get(bias_key), prefix in embeddings,
                                                       config)
    shapes = {p: (m.matrix_shape if m.kind != "full" or m.has_weight else None) for p, m in modules.items()}
    naming = resolve(shapes, profile, style_of(src.keys()), peft_dir=config is not None)
    if profile == "custom" and suffixes is not None:
        naming = Naming("custom", naming.arch, naming.names)
    by_name: dict[str, AdapterModule] = {}
    table = sdxl_modules() if naming.arch == "sdxl" else {}
    for prefix, module in modules.items():
        name = naming.names[prefix]
        if name in by_name:
            raise FormatError(f"{path} holds module '{name}' twice (as '{prefix}' and another alias)")
        if name in table and module.weight_shape != table[name].shape and module.kind != "full":
            module.shape_hint = table[name].shape
        by_name[name] = module
    return LoraSet(by_name, naming, dict(src.metadata), path, config,
                   peft_embeddings=frozenset(naming.names[p] for p in embeddings))


# ---------------------------------------------------------------- writing

def _role_suffix(role: str, suffixes: Suffixes) -> Optional[str]:
    return {UP: suffixes.up, DOWN: suffixes.down, ALPHA: suffixes.alpha}.get(role, "." + role)


def _file_tensors(modules: dict[str, AdapterModule], suffixes: Suffixes) -> Iterator[tuple[str, str, torch.Tensor]]:
    """(key `<name><suffix>`, role, tensor as held) for every tensor a file of `modules` holds."""
    for name, module in modules.items():
        for role, tensor in module.tensors().items():
            suffix = _role_suffix(role, suffixes)
            if suffix is not None:
                yield name + suffix, role, tensor


def _file_dtype(role: str, dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if role == ALPHA else dtype


def state_dict_of(modules: dict[str, AdapterModule], suffixes: Suffixes,
                  dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """Flat tensors for a file: `<name><suffix>`; alpha kept in fp32, everything else cast to dtype (a
    NonFiniteError when a value does not fit it)."""
    return {key: narrowed(tensor.detach().to("cpu"), _file_dtype(role, dtype), f"'{key}'").contiguous()
            for key, role, tensor in _file_tensors(modules, suffixes)}


def module_state(name: str, module: AdapterModule, dtype: torch.dtype,
                 suffixes: Suffixes = KOHYA) -> dict[str, torch.Tensor]:
    """One module's part of state_dict_of (kohya names unless told): what a file holds for it, cast."""
    return state_dict_of({name: module}, suffixes, dtype)


def save_pickle(state: dict, path: Path) -> None:
    """torch.save through a Python file: a full disk or a refused write is then an OSError with its errno (a
    one-line write error), not torch's own writer's bare RuntimeError."""
    with open(path, "wb") as fh:
        torch.save(state, fh)


def save_lora(modules: dict[str, AdapterModule], path: PathLike, arch: str = "sdxl", profile: str = "sdxl",
              dtype: Union[str, torch.dtype] = "fp16", overwrite: bool = False, recipe: Optional[dict] = None,
              suffixes: Optional[Suffixes] = None, peft_config: Optional[dict] = None,
              title: Optional[str] = None, carried: Optional[dict[str, str]] = None,
              peft_embeddings: frozenset[str] = frozenset()) -> Path:
    """Write modules as kohya names (sdxl/kohya), custom suffixes, or a PEFT folder; returns the path.
    `carried`: metadata kept from the inputs (files.metadata.carried_metadata); `peft_embeddings`: modules to
    write as PEFT LoRAs on an nn.Embedding (lora_embedding_A/B)."""
    path = Path(path)
    dt = dtype_of(dtype)
    if not modules:
        raise MergeCoreError("nothing to write: the result has no modules")
    ranks = [m.rank for m in modules.values() if m.kind != "full"]
    alphas = [m.alpha for m in modules.values() if getattr(m, "alpha", None) is not None]
    meta = lora_metadata({m.kind for m in modules.values()}, ranks, alphas, arch, recipe, title or path.stem, carried)
    if profile == "peft":
        biases = any(m.diff_b is not None for m in modules.values())
        config = peft_layout.config_for(peft_layout.ranks_of(modules), peft_config, biases)
        entries = peft_layout.entries(modules, dt, peft_embeddings, biases)
        tensors_of = partial(peft_layout.module_tensors, dtype=dt, embeddings=peft_embeddings, biases=biases)
    else:
        suffixes = suffixes or KOHYA
        entries = [(key, _file_dtype(role, dt), tuple(t.shape)) for key, role, t in _file_tensors(modules, suffixes)]
        tensors_of = partial(module_state, dtype=dt, suffixes=suffixes)
    def file_tensors() -> Iterator[tuple[str, torch.Tensor]]:
        """(key, tensor as written), module by module, each module's made as they are needed."""
        return (item for name, m in modules.items() for item in tensors_of(name, m).items())

    if path.suffix.lower() in PICKLE_OUTPUTS:  # torch.save needs the whole state dict at once
        return atomic_write(path, lambda tmp: save_pickle(dict(file_tensors()), tmp), overwrite)

    def write(tmp: Path) -> None:
        """Module by module: memory holds one module's file tensors, not the whole state dict and a serialised
        copy of it."""
        write_safetensors(tmp, file_tensors(), header_bound(entries, meta), meta)

    if profile == "peft" and path.suffix.lower() != ".safetensors":
        return peft_layout.write_folder(path, write, lambda: config, overwrite)
    return atomic_write(path, write, overwrite)


def summary(lset: LoraSet) -> dict:
    """What `inspect` prints: format, architecture, counts by kind and part, ranks, alphas, dtypes, and the
    modules holding NaN/inf (every tensor is read for that) or an alpha ≤ 0 (ComfyUI and A1111 scale by α/r:
    α = 0 makes a module do nothing, α < 0 flips its sign — a damaged or mis-converted file, as trainers
    write α > 0)."""
    parts: dict[str, int] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, int] = {}
    dtypes: dict[str, int] = {}
    params = 0
    for name, m in lset.modules.items():
        part = ("unet" if name.startswith("lora_unet_") else "te1" if name.startswith("lora_te1_")
                else "te2" if name.startswith("lora_te2_") else "te" if name.startswith("lora_te_") else "other")
        parts[part] = parts.get(part, 0) + 1
        ranks[str(m.rank)] = ranks.get(str(m.rank), 0) + 1
        a = getattr(m, "alpha", None)
        alphas["none" if a is None else f"{a:g}"] = alphas.get("none" if a is None else f"{a:g}", 0) + 1
        for role, t in m.tensors().items():
            if role != ALPHA:
                dtypes[str(t.dtype).replace("torch.", "")] = dtypes.get(str(t.dtype).replace("torch.", ""), 0) + 1
        params += parameter_count(m)
    return {"path": str(lset.source), "profile": lset.profile, "architecture": lset.arch,
            "flux_naming": flux_naming(lset.modules), "zimage_naming": zimage_naming(lset.modules),
            "blocks": _blocks(lset),
            "modules": len(lset.modules), "kinds": lset.kinds(), "parts": parts, "ranks": ranks, "alphas": alphas,
            "dtypes": dtypes, "parameters": params, "dora_modules": len(lset.dora_modules()),
            "non_finite_modules": [name for name, m in lset.modules.items() if not m.is_finite()],
            "zero_alpha_modules": [name for name, m in lset.modules.items() if getattr(m, "alpha", None) == 0],
            "negative_alpha_modules": [name for name, m in lset.modules.items()
                                       if (getattr(m, "alpha", None) or 0) < 0],
            "metadata": lset.metadata}


def counts_text(counts: dict) -> str:
    """{value: count} as 'a: 3, b: 1' (most frequent first), or '-'."""
    return ", ".join(f"{k}: {v}" for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))) or "-"


def _modules(names: Sequence[str], verb: str = "have") -> str:
    """'1 module has' / '3 modules have' (verb in the plural: have, hold, carry)."""
    singular = "has" if verb == "have" else verb + "s"
    return f"1 module {singular}" if len(names) == 1 else f"{len(names)} modules {verb}"


def _blocks(lset: LoraSet) -> Optional[dict]:
    held = blocks_held(lset.modules, lset.arch)
    return None if held is None else {"model": held[0], "held": held[1]}


def _blocks_line(blocks: Optional[dict]) -> list[tuple[str, str]]:
    """The blocks a LoRA touches, for choosing block weights (SDXL: whether the 12-value form names them all)."""
    if blocks is None:
        return []
    model, held = blocks["model"], blocks["held"]
    form = ""
    if model == "SDXL":
        form = ("; the 12-value block weights name them all" if set(held) <= set(BLOCKS_12)
                else "; LoCon blocks too: 12-value block weights set those to 0, use 20 values or names")
    return [("blocks", f"{model} {block_runs(held)}{form}")]


def summary_lines(info: dict) -> list[tuple[str, str]]:
    """(label, text) lines of a summary() for people (inspect, the Load LoRA node): what the file is, then what
    is wrong with it or needs care — DoRA, NaN/inf, alpha 0 or below."""
    blocks = FLUX_NAMING.get(info.get("flux_naming")) or ZIMAGE_NAMING.get(info.get("zimage_naming"))
    lines = [("format", f"{info['profile']} names, architecture {info['architecture']}"
                        + (f" ({blocks})" if blocks else "")),
             ("modules", f"{info['modules']}  ({counts_text(info['kinds'])})"),
             ("parts", counts_text(info["parts"])), *_blocks_line(info.get("blocks")),
             ("ranks", counts_text(info["ranks"])),
             ("alphas", counts_text(info["alphas"])), ("dtypes", counts_text(info["dtypes"])),
             ("parameters", f"{info['parameters']:,}")]
    if info["dora_modules"]:
        lines.append(("DoRA", f"{info['dora_modules']} modules carry dora_scale (cannot be merged linearly)"))
    damaged, zero, negative = (info[k] for k in ("non_finite_modules", "zero_alpha_modules", "negative_alpha_modules"))
    if damaged:
        lines.append(("NaN/inf", f"{_modules(damaged, 'hold')} NaN or infinite values, e.g. '{damaged[0]}' (a damaged "
                                 "file; merge, fuse and bake refuse it)"))
    if zero:
        lines.append(("alpha 0", f"{_modules(zero)} alpha 0, e.g. '{zero[0]}': ComfyUI, A1111 and merges scale by "
                                 "α/r = 0, so they change nothing"))
    if negative:
        lines.append(("alpha < 0", f"{_modules(negative)} a negative alpha, e.g. '{negative[0]}': applied with the "
                                   "sign flipped (α/r < 0); trainers write α > 0, so the file may be damaged or "
                                   "mis-converted"))
    return lines
