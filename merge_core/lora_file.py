"""Read any common LoRA/LyCORIS file into one data model (a LoraSet), and write one back.

Reads: kohya/LyCORIS `.safetensors`, diffusers and PEFT names, PEFT folders (adapter_model.safetensors +
adapter_config.json), `.pt/.pth/.ckpt` (weights_only).  Writes: kohya names (SDXL and kohya profiles),
the PEFT folder layout, or custom suffixes; atomically and never over an existing file unless asked.
"""
from __future__ import annotations

import json
import os
import re
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

import torch

from .adapters import AdapterModule, LoRA, module_from_roles, parameter_count
from .errors import DoraError, FormatError, MergeCoreError, NonFiniteError
from .files.atomic import atomic_folder, atomic_write
from .files.metadata import lora_metadata, sha256_later
from .files.stream_writer import header_bound, write_safetensors
from .files.tensor_source import TensorSource
from .keys.profiles import Naming, resolve
from .keys.sdxl_table import sdxl_modules
from .keys.suffixes import (ALPHA, DOWN, KOHYA, PEFT_BIAS, PEFT_EMBEDDING_A, PEFT_EMBEDDING_B, UP, Suffixes,
                            group_keys, style_of)

PathLike = Union[str, os.PathLike]
Entry = tuple[str, torch.dtype, tuple[int, ...]]  # a tensor a file will hold: name, dtype, shape
PEFT_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
PEFT_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
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

def _peft_alpha(module: str, config: dict) -> Optional[float]:
    """lora_alpha for a module from adapter_config.json (alpha_pattern wins; rsLoRA folded in)."""
    path = module[len(PEFT_PREFIX):] if module.startswith(PEFT_PREFIX) else module
    alpha = config.get("lora_alpha")
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.fullmatch(rf"(.*\.)?{pattern}", path):
            alpha = value
            break
    return None if alpha is None else float(alpha)


def _open(path: Path) -> tuple[TensorSource, Optional[dict]]:
    if path.is_dir() and (path / PEFT_CONFIG).exists():
        weights = next((path / w for w in PEFT_WEIGHTS if (path / w).exists()), None)
        if weights is None:
            raise FormatError(f"PEFT folder has {PEFT_CONFIG} but no adapter_model.safetensors: {path}")
        try:
            config = json.loads((path / PEFT_CONFIG).read_text())
        except ValueError as exc:
            raise FormatError(f"corrupt {PEFT_CONFIG} in {path}: {exc}") from None
        return TensorSource(weights), config
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


def _peft_conventions(prefix: str, module: AdapterModule, bias: Optional[torch.Tensor], embedding: bool,
                      config: Optional[dict]) -> AdapterModule:
    """PEFT's conventions on a module read by roles: an embedding's B·A is ΔWᵀ (held as up = Aᵀ, down = Bᵀ, like
    any LoRA); α from adapter_config.json (rsLoRA folded in); lora_B's bias b is the bias delta (α/r)·b."""
    if not isinstance(module, LoRA):
        if bias is not None:
            raise FormatError(f"module '{prefix}' has a lora_B.bias but no LoRA factors")
        return module
    if embedding:
        module.up, module.down = module.down.T, module.up.T
    if module.alpha is None and config is not None:
        module.alpha = _peft_alpha(prefix, config)
        if module.alpha is not None and config.get("use_rslora"):
            module.alpha *= module.rank ** 0.5
    if bias is not None:
        if module.diff_b is not None:
            raise FormatError(f"module '{prefix}' has both a lora_B.bias and a diff_b")
        module.diff_b = bias.float() * module.scale
    return module


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
        modules[prefix] = _peft_conventions(prefix, module, tensors.get(bias_key), prefix in embeddings, config)
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
    """Flat tensors for a file: `<name><suffix>`; alpha kept in fp32, everything else cast to dtype."""
    return {key: tensor.detach().to("cpu").to(_file_dtype(role, dtype)).contiguous()
            for key, role, tensor in _file_tensors(modules, suffixes)}


def _module_state(name: str, module: AdapterModule, suffixes: Suffixes,
                  dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One module's part of state_dict_of."""
    return state_dict_of({name: module}, suffixes, dtype)


def _peft_ranks(modules: dict[str, AdapterModule]) -> dict[str, int]:
    """Each module's rank by its name in the PEFT config; only plain LoRA modules have a PEFT form."""
    ranks = {}
    for name, m in modules.items():
        if not isinstance(m, LoRA) or m.mid is not None:
            raise FormatError(f"the PEFT layout holds only plain LoRA modules; '{name}' is {m.kind}")
        ranks[name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name] = m.rank
    return ranks


def _peft_tensors(name: str, m: LoRA, dtype: torch.dtype, embeddings: frozenset[str],
                  biases: bool) -> dict[str, torch.Tensor]:
    """PEFT tensors with the module's α/r folded into lora_B (so the config says scale 1); an embedding's
    transposed back, ΔW = (B·A)ᵀ: lora_embedding_B = downᵀ, lora_embedding_A = (up·α/r)ᵀ.  `biases`
    (lora_bias): lora_B.bias = the bias delta, zeros for a module without one."""
    up = (m.up.float() * m.scale).to(dtype)
    if name in embeddings:
        return {name + PEFT_EMBEDDING_B: m.down.T.to(dtype).contiguous(), name + PEFT_EMBEDDING_A: up.T.contiguous()}
    out = {f"{name}.lora_B.weight": up.contiguous(), f"{name}.lora_A.weight": m.down.to(dtype).contiguous()}
    if biases:
        out[f"{name}.lora_B.bias"] = (m.diff_b if m.diff_b is not None else torch.zeros(m.up.shape[0])).to(dtype)
    return out


def _peft_entries(modules: dict[str, AdapterModule], dtype: torch.dtype, embeddings: frozenset[str],
                  biases: bool) -> list[Entry]:
    out: list[Entry] = []
    for name, m in modules.items():
        up, down = tuple(m.up.shape), tuple(m.down.shape)
        if name in embeddings:
            out += [(name + PEFT_EMBEDDING_B, dtype, down[::-1]), (name + PEFT_EMBEDDING_A, dtype, up[::-1])]
            continue
        out += [(f"{name}.lora_B.weight", dtype, up), (f"{name}.lora_A.weight", dtype, down)]
        if biases:
            out.append((f"{name}.lora_B.bias", dtype, up[:1]))
    return out


def _peft_config(ranks: dict[str, int], base: Optional[dict], biases: bool) -> dict:
    r = max(ranks.values()) if ranks else 1
    config = {k: v for k, v in (base or {}).items() if k not in ("r", "lora_alpha", "rank_pattern", "alpha_pattern")}
    config.setdefault("peft_type", "LORA")
    if config.get("use_dora"):  # the magnitudes are not written (DoRA inputs are refused or merged without them)
        config["use_dora"] = False
    if biases or config.get("lora_bias"):  # lora_B carries the bias deltas (PEFT ≥ 0.14)
        config["lora_bias"] = biases
    config.update(r=r, lora_alpha=r, use_rslora=False,
                  rank_pattern={re.escape(k): v for k, v in ranks.items() if v != r},
                  alpha_pattern={re.escape(k): v for k, v in ranks.items() if v != r})
    if not config.get("target_modules"):
        config["target_modules"] = sorted({k.rsplit(".", 1)[-1] for k in ranks})
    return config


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
        config = _peft_config(_peft_ranks(modules), peft_config, biases)
        entries = _peft_entries(modules, dt, peft_embeddings, biases)
        tensors_of = partial(_peft_tensors, dtype=dt, embeddings=peft_embeddings, biases=biases)
    else:
        suffixes = suffixes or KOHYA
        if path.suffix.lower() in (".pt", ".pth", ".ckpt"):
            return atomic_write(path, lambda tmp: torch.save(state_dict_of(modules, suffixes, dt), tmp), overwrite)
        entries = [(key, _file_dtype(role, dt), tuple(t.shape)) for key, role, t in _file_tensors(modules, suffixes)]
        tensors_of = partial(_module_state, suffixes=suffixes, dtype=dt)

    def write(tmp: Path) -> None:
        """Module by module, each module's file tensors made as they are written: memory holds one module's,
        not the whole state dict and a serialised copy of it."""
        write_safetensors(tmp, (item for name, m in modules.items() for item in tensors_of(name, m).items()),
                          header_bound(entries, meta), meta)

    if profile == "peft" and path.suffix != ".safetensors":
        return _write_peft_dir(path, write, config, overwrite)
    return atomic_write(path, write, overwrite)


def _write_peft_dir(path: Path, write_weights: Callable[[Path], None], config: dict, overwrite: bool) -> Path:
    """A PEFT folder, built in a temp folder beside the target and moved into place (files.atomic_folder)."""
    def write(tmp: Path) -> None:
        write_weights(tmp / PEFT_WEIGHTS[0])
        (tmp / PEFT_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))

    return atomic_folder(path, write, overwrite)


def summary(lset: LoraSet) -> dict:
    """What `inspect` prints: format, architecture, counts by kind and part, ranks, alphas, dtypes."""
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
            "modules": len(lset.modules), "kinds": lset.kinds(), "parts": parts, "ranks": ranks, "alphas": alphas,
            "dtypes": dtypes, "parameters": params, "dora_modules": len(lset.dora_modules()),
            "metadata": lset.metadata}
