"""`inspect FILE [--json]`: format, architecture, modules by kind and by UNet/TE1/TE2, ranks, alphas,
dtypes, modules holding NaN/inf or an alpha ≤ 0, metadata."""
from __future__ import annotations

import argparse
import json

from ..keys.profiles import PROFILES
from ..lora_file import load_lora, summary


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="describe a LoRA / LyCORIS file")
    p.add_argument("file", help="a .safetensors/.pt file or a PEFT folder")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.add_argument("--profile", default="auto", choices=PROFILES)
    p.add_argument("--metadata", action="store_true", help="print every metadata entry in full")
    p.set_defaults(run=run)


def _counts(d: dict) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(d.items(), key=lambda kv: (-kv[1], kv[0]))) or "-"


def _modules(names: list) -> str:
    return "1 module has" if len(names) == 1 else f"{len(names)} modules have"


def run(args: argparse.Namespace) -> int:
    info = summary(load_lora(args.file, profile=args.profile))
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"file:          {info['path']}")
    print(f"format:        {info['profile']} names, architecture {info['architecture']}")
    print(f"modules:       {info['modules']}  ({_counts(info['kinds'])})")
    print(f"parts:         {_counts(info['parts'])}")
    print(f"ranks:         {_counts(info['ranks'])}")
    print(f"alphas:        {_counts(info['alphas'])}")
    print(f"dtypes:        {_counts(info['dtypes'])}")
    print(f"parameters:    {info['parameters']:,}")
    if info["dora_modules"]:
        print(f"DoRA:          {info['dora_modules']} modules carry dora_scale (cannot be merged linearly)")
    damaged = info["non_finite_modules"]
    if damaged:
        print(f"NaN/inf:       {len(damaged)} modules hold NaN or infinite values, e.g. '{damaged[0]}' (a damaged "
              "file; merge, fuse and bake refuse it)")
    zero, negative = info["zero_alpha_modules"], info["negative_alpha_modules"]
    if zero:
        print(f"alpha 0:       {_modules(zero)} alpha 0, e.g. '{zero[0]}': ComfyUI, A1111 and "
              "merges scale by α/r = 0, so they change nothing")
    if negative:
        print(f"alpha < 0:     {_modules(negative)} a negative alpha, e.g. '{negative[0]}': applied with the sign "
              "flipped (α/r < 0); trainers write α > 0, so the file may be damaged or mis-converted")
    meta = info["metadata"]
    if meta:
        print(f"metadata:      {len(meta)} entries")
        for k in sorted(meta):
            v = meta[k]
            print(f"  {k}: {v if args.metadata or len(v) <= 80 else v[:77] + '...'}")
    return 0
