#!/usr/bin/env python
"""Write merge_core/data/sdxl_modules.json: every module a kohya SDXL LoRA/LoCon can target.

The table is derived from the real ComfyUI (0.3.75, via tests/comfy_host): the SDXL
base UNet and both text encoders are built on the meta device (structure only, no
weights) and walked in model order.  Every entry is checked against ComfyUI's own
LoRA key map (``comfy.lora.model_lora_keys_unet`` / ``model_lora_keys_clip``).

Which modules a kohya network targets (sd-scripts ``networks/lora.py`` rules):

* UNet, plain LoRA: every Linear inside a SpatialTransformer (kohya
  "Transformer2DModel"): proj_in, proj_out, attn1/attn2 to_q/to_k/to_v/to_out.0,
  ff.net.0.proj, ff.net.2.  ``locon: false``.
* UNet, LoCon (``conv_dim`` set): additionally every Linear/Conv2d inside ResBlocks
  (in_layers.2, out_layers.3, skip_connection where it is a conv, emb_layers.1),
  the Downsample ``op`` conv and the Upsample ``conv``.  ``locon: true``.
* Text encoders: q/k/v/out_proj, fc1, fc2 of every layer (12 in CLIP-L = te1,
  32 in CLIP-G = te2).  ``locon: false``.

Usage:
    python tools/make_sdxl_table.py            # (re)write the table
    python tools/make_sdxl_table.py --check    # exit 1 if the file is out of date
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT_PATH = REPO / "merge_core" / "data" / "sdxl_modules.json"
sys.path.insert(0, str(REPO / "tests"))

from comfy_host.inprocess import (  # noqa: E402
    COMFYUI_VERSION, SDXL_UNET_CONFIG, import_comfy, sdxl_lora_key_map, sdxl_model_and_clip_meta)

EXPECTED_UNET_LORA = 722
EXPECTED_TE = 264  # 6 x 12 (CLIP-L) + 6 x 32 (CLIP-G)
TE_LAYER_MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                    "self_attn.out_proj", "mlp.fc1", "mlp.fc2")
TE_GROUPS = (("te1", "clip_l", 12), ("te2", "clip_g", 32))


def _block_id(ldm_path: str) -> str:
    head, idx = ldm_path.split(".")[:2]
    if head == "input_blocks":
        return "IN{:02d}".format(int(idx))
    if head == "output_blocks":
        return "OUT{:02d}".format(int(idx))
    if head == "middle_block":
        return "MID"
    raise ValueError(f"no block id for {ldm_path}")


def _kind(module) -> str:
    import torch

    if isinstance(module, torch.nn.Linear):
        return "linear"
    if isinstance(module, torch.nn.Conv2d):
        return "conv"
    raise TypeError(type(module))


def _unet_modules(model) -> list[dict]:
    import torch
    import comfy.utils
    from comfy.ldm.modules.attention import SpatialTransformer
    from comfy.ldm.modules.diffusionmodules.openaimodel import Downsample, ResBlock, Upsample

    ldm_to_diffusers = {}
    for diff_key, ldm_key in comfy.utils.unet_to_diffusers(model.model_config.unet_config).items():
        if diff_key.endswith(".weight"):
            ldm_to_diffusers[ldm_key[:-len(".weight")]] = diff_key[:-len(".weight")]

    unet = model.diffusion_model
    named = dict(unet.named_modules())
    rows = []
    for path, module in unet.named_modules():
        if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        parts = path.split(".")
        owner = None
        for i in range(len(parts) - 1, 0, -1):
            parent = named[".".join(parts[:i])]
            if isinstance(parent, (SpatialTransformer, ResBlock, Downsample, Upsample)):
                owner = parent
                break
        if owner is None:  # time_embed, label_emb, conv_in, conv_out: never targeted
            continue
        kind = _kind(module)
        if isinstance(owner, SpatialTransformer):
            if kind != "linear":
                raise AssertionError(f"SDXL transformer has a conv {path}: kohya would make it LoCon")
            locon = False
        else:
            locon = True
        rows.append({
            "name": "lora_unet_" + path.replace(".", "_"),
            "group": "unet",
            "kind": kind,
            "shape": list(module.weight.shape),
            "key": f"diffusion_model.{path}.weight",
            "diffusers": ldm_to_diffusers.get(path),
            "block": _block_id(path),
            "locon": locon,
        })
    return rows


def _te_modules(clip_model) -> list[dict]:
    import torch

    rows = []
    for group, prefix, n_layers in TE_GROUPS:
        encoder = getattr(clip_model, prefix)
        layer_prefix = f"{prefix}.transformer.text_model.encoder.layers."
        found = 0
        for path, module in clip_model.named_modules():
            if not path.startswith(layer_prefix) or not isinstance(module, torch.nn.Linear):
                continue
            inner = path[len(f"{prefix}.transformer."):]  # text_model.encoder.layers.N.xxx
            layer, sub = inner[len("text_model.encoder.layers."):].split(".", 1)
            if sub not in TE_LAYER_MODULES:
                raise AssertionError(f"unexpected Linear in text encoder layer: {path}")
            rows.append({
                "name": f"lora_{group}_" + inner.replace(".", "_"),
                "group": group,
                "kind": "linear",
                "shape": list(module.weight.shape),
                "key": f"{path}.weight",
                "diffusers": inner,
                "block": "BASE",
                "locon": False,
            })
            found += 1
        if found != 6 * n_layers:
            raise AssertionError(f"{group}: {found} modules, expected {6 * n_layers} ({encoder.__class__})")
    return rows


def build_table() -> dict:
    import_comfy()
    model, clip_model = sdxl_model_and_clip_meta()
    unet_rows = _unet_modules(model)
    te_rows = _te_modules(clip_model)
    modules = unet_rows + te_rows

    n_unet = sum(1 for m in unet_rows if not m["locon"])
    n_locon = sum(1 for m in unet_rows if m["locon"])
    assert n_unet == EXPECTED_UNET_LORA, n_unet
    assert len(te_rows) == EXPECTED_TE, len(te_rows)
    assert n_unet + len(te_rows) == 986
    names = [m["name"] for m in modules]
    assert len(set(names)) == len(names), "duplicate kohya names"

    key_map = sdxl_lora_key_map()
    for m in modules:
        got = key_map.get(m["name"])
        if got != m["key"]:
            raise AssertionError(f"ComfyUI maps {m['name']} to {got!r}, table says {m['key']!r}")
        if m["group"] == "unet" and m["diffusers"] is not None:
            got = key_map.get("lora_unet_" + m["diffusers"].replace(".", "_"))
            if got != m["key"]:
                raise AssertionError(f"diffusers alias of {m['name']} maps to {got!r}")
    missing_diffusers = [m["name"] for m in unet_rows if m["diffusers"] is None]
    if missing_diffusers:
        raise AssertionError(f"no diffusers path for {missing_diffusers[:5]} ...")

    counts = {
        "unet": n_unet,
        "te1": sum(1 for m in te_rows if m["group"] == "te1"),
        "te2": sum(1 for m in te_rows if m["group"] == "te2"),
        "lora_total": n_unet + len(te_rows),
        "locon_extra": n_locon,
        "locon_total": len(modules),
    }
    return {
        "format": 1,
        "model": "SDXL base 1.0",
        "source": f"ComfyUI {COMFYUI_VERSION} (meta-device build), tools/make_sdxl_table.py",
        "unet_config": {k: v for k, v in SDXL_UNET_CONFIG.items()},
        "counts": counts,
        "modules": modules,
    }


def render(table: dict) -> str:
    head = {k: v for k, v in table.items() if k != "modules"}
    lines = ["{"]
    for k, v in head.items():
        lines.append(f"{json.dumps(k)}: {json.dumps(v, separators=(',', ':'))},")
    lines.append('"modules": [')
    rows = [json.dumps(m, separators=(",", ":")) for m in table["modules"]]
    lines.append(",\n".join(rows))
    lines.append("]")
    lines.append("}")
    text = "\n".join(lines) + "\n"
    json.loads(text)  # must stay valid JSON
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare with the committed file instead of writing")
    ap.add_argument("--out", type=Path, default=OUT_PATH)
    args = ap.parse_args(argv)

    table = build_table()
    text = render(table)
    c = table["counts"]
    summary = (f"unet {c['unet']} + te1 {c['te1']} + te2 {c['te2']} = {c['lora_total']} LoRA modules; "
               f"LoCon adds {c['locon_extra']} (total {c['locon_total']})")
    if args.check:
        current = args.out.read_text(encoding="utf-8") if args.out.is_file() else ""
        if current != text:
            print(f"{args.out} is out of date; run python tools/make_sdxl_table.py", file=sys.stderr)
            return 1
        print(f"{args.out} is up to date: {summary}")
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.out}: {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
