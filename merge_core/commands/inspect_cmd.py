"""`inspect FILE [--json]`: format, architecture, modules by kind and by UNet/TE1/TE2, ranks, alphas,
dtypes, modules holding NaN/inf or an alpha ≤ 0, metadata; with --ranks, what resizing it would keep."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..keys.profiles import PROFILES
from ..lora_file import load_lora, summary, summary_lines
from ..merge.rank_table import rank_table, table_lines
from .common import add_device


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="describe a LoRA / LyCORIS file")
    p.add_argument("file", help="a .safetensors/.pt file or a PEFT folder")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.add_argument("--profile", default="auto", choices=PROFILES)
    p.add_argument("--metadata", action="store_true", help="print every metadata entry in full")
    p.add_argument("--ranks", action="store_true",
                   help="also show what resizing it would keep: per energy level and fixed rank, the ranks, the "
                        "share of ‖ΔW‖² kept and the fp16 file size (from every module's exact singular values)")
    add_device(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    lset = load_lora(args.file, profile=args.profile)
    info = summary(lset)
    if args.ranks:  # not for a damaged file: its NaN/inf would stop the table's SVDs (listed below instead)
        info["resize"] = (None if info["non_finite_modules"] else
                          rank_table(lset, title=Path(args.file).stem, device=args.device))
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for label, text in [("file", info["path"]), *summary_lines(info)]:
        print(f"{label + ':':<15}{text}")
    if args.ranks:
        print("\n".join(["resize:        what `merge FILE --energy E --min-rank 1` or `--rank R` would keep (exact):",
                         *("  " + line for line in table_lines(info["resize"]))]) if info["resize"] is not None else
              "resize:        not computed: the file holds NaN or infinite values (see NaN/inf above)")
    meta = info["metadata"]
    if meta:
        print(f"metadata:      {len(meta)} entries")
        for k in sorted(meta):
            v = meta[k]
            print(f"  {k}: {v if args.metadata or len(v) <= 80 else v[:77] + '...'}")
    return 0
