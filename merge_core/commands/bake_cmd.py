"""`bake --source-model BASE --lora-model LORA -o OUT`: BASE + alpha·ΔW for every module of LORA (LoRA, LoCon,
LoHa, LoKr, .diff), streamed one tensor at a time; the output keeps BASE's keys and metadata."""
from __future__ import annotations

import argparse

from ..bake import bake_lora
from ..checkpoint.sources import KINDS
from .common import add_device, add_output, add_report, check_side_files, finite_float, output_path, write_report
from .progress_line import ProgressLine

DTYPES = ["fp16", "float16", "bf16", "bfloat16", "fp32", "float32"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bake", help="bake a LoRA into a model checkpoint",
                       description="Write BASE + alpha·ΔW (ΔW as ComfyUI applies each module) as a new checkpoint "
                                   "in BASE's own layout; modules that do not fit are reported and left out.")
    p.add_argument("--source-model", required=True, metavar="BASE",
                   help="base model: .safetensors, folder of shards, or .pt/.pth/.ckpt (weights_only)")
    p.add_argument("--source-type", default="auto", choices=KINDS, help="format of BASE (default: by file name)")
    p.add_argument("--lora-model", required=True, metavar="LORA", help="LoRA/LyCORIS/diff file or PEFT folder")
    p.add_argument("--lora-type", default="auto", choices=KINDS, help="format of LORA (default: by file name)")
    p.add_argument("--alpha", type=finite_float, default=1.0, help="bake strength s in W + s·ΔW (default 1.0)")
    p.add_argument("--output-dtype", choices=DTYPES,
                   help="cast floating-point output tensors (default: keep each base tensor's dtype)")
    p.add_argument("--output-format", choices=["safetensors", "pytorch"],
                   help="default: pytorch for -o *.pt/.pth/.ckpt, else safetensors (suffix appended if missing)")
    add_device(p)
    add_report(p)
    add_output(p, "output checkpoint (.safetensors, or .pt/.pth/.ckpt; a missing suffix is added per --output-format)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    out = output_path(args.output, args.output_format)
    check_side_files(args, out, [args.source_model, args.lora_model])
    with ProgressLine("bake") as progress:
        report = bake_lora(args.source_model, args.lora_model, out, alpha=args.alpha, output_dtype=args.output_dtype,
                           overwrite=args.overwrite, device=args.device, progress=progress,
                           base_kind=args.source_type, lora_kind=args.lora_type)
    print(f"baked {len(report['matched'])} modules into {report['patched_keys']} of {report['base_keys']} "
          f"base tensors ({report['seconds']:.1f} s)")
    for s in report["skipped"][:20]:
        print(f"  skipped {s['module']} ({s['role']}): {s['reason']}")
    if len(report["skipped"]) > 20:
        print(f"  ... {len(report['skipped']) - 20} more skipped (see --report)")
    print(f"wrote {out}")
    write_report(args.report, report, args.overwrite)
    return 0
