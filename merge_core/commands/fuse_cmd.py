"""`fuse M1 M2 [M3 ...] -o OUT`: fuse LoKr/LoHa/LoRA files on their exact deltas (five strategies, three
output forms), as the original multi-model LyCORIS fusion tool's interface, with correct math."""
from __future__ import annotations

import argparse
import time

from ..files.atomic import refuse_existing
from ..fuse import DORA_CHOICES, OUTPUT_FORMATS, STRATEGIES, fusion_metadata, verify_written
from ..fuse.engine import DEFAULT_RULE, collect, plan_fuse, resolve_weights
from ..fuse.to_file import fuse_to_file
from ..lora_file import load_lora
from .common import (add_device, add_dtype, add_output, add_rank_rule, add_report, add_threads, apply_threads,
                     check_side_files, finite_float, output_path, rank_rule, write_report)
from .progress_line import ProgressLine

STRATEGY_HELP = ("weighted_sum: Σ wᵢΔWᵢ; weighted_average: Σ wᵢΔWᵢ/Σ wᵢ; layer_adaptive: wᵢ scaled by the "
                 "inverse variance of ΔWᵢ relative to the others (mean factor 1); smart_fusion (default): wᵢ scaled by "
                 "‖ΔWᵢ‖ relative to the others (mean factor 1); min_max_norm: Σ wᵢΔWᵢ scaled so max|ΔW| ≤ "
                 "--norm-threshold × the largest input's max|ΔWᵢ|")
FORMAT_HELP = ("auto (default): lokr where the nearest Kronecker product keeps ≥ 99.9%% of the energy, else lora; "
               "lokr: nearest Kronecker product (LoKr inputs of one factor shape, else lora per module); "
               "lora: exact low-rank under the rank rule; full: exact dense .diff (large)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fuse", help="fuse several LoKr/LoHa/LoRA files into one, exactly on the deltas",
                       description="Fuse LoKr/LoHa (and LoRA/LoCon/full) files module by module: "
                                   "T = Σ cᵢ ΔWᵢ with cᵢ from the strategy, written as lokr, lora or full.")
    p.add_argument("models", nargs="+", help="input files (.safetensors/.pt) or PEFT folders; types auto-detected")
    p.add_argument("--weights", type=finite_float, nargs="+", metavar="W",
                   help="one weight per model (default 1/N each)")
    p.add_argument("--strategy", choices=STRATEGIES, default="smart_fusion", help=STRATEGY_HELP)
    p.add_argument("--norm-threshold", type=finite_float, default=1.0, metavar="T",
                   help="min_max_norm's τ (default 1.0)")
    p.add_argument("--output-format", choices=OUTPUT_FORMATS, default="auto", help=FORMAT_HELP)
    add_rank_rule(p, energy=DEFAULT_RULE.energy, min_rank=DEFAULT_RULE.min_rank, max_rank=DEFAULT_RULE.max_rank)
    add_threads(p)
    add_device(p)
    add_dtype(p)
    p.add_argument("--dora", choices=DORA_CHOICES, default="error",
                   help="DoRA inputs: error (default) or ignore (use the low-rank part without its magnitude)")
    p.add_argument("--metadata", metavar="META.json", help="write inputs (sha256), weights, strategy and "
                                                           "per-module kind/error/energy as JSON")
    p.add_argument("--verify", action="store_true", help="reload the written file and report per-module error "
                                                         "against the exact fused delta")
    add_output(p, "output: a .safetensors (appended if missing) or .pt/.pth/.ckpt file")
    add_report(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    resolve_weights(args.weights, len(args.models))  # count mismatch fails before any file is read
    apply_threads(args)
    out = output_path(args.output)
    refuse_existing(out, args.overwrite, args.models)
    check_side_files(args, out, args.models)
    sets = [load_lora(m) for m in args.models]
    plan = plan_fuse(sets, args.weights, args.strategy, args.norm_threshold, args.output_format, rank_rule(args),
                     args.dora)
    plan.dtype = args.dtype
    with ProgressLine("fuse") as progress:
        if out.suffix.lower() == ".safetensors":  # written as the modules are fused
            path, report = out, fuse_to_file(plan, out, args.dtype, args.overwrite, args.device, progress)
        else:
            result = collect(plan, args.device, progress)
            path, report = result.save(out, dtype=args.dtype, overwrite=args.overwrite), result.report
    print(report.table())
    print(f"wrote {path} ({', '.join(f'{k}: {v}' for k, v in sorted(report.extra['kinds'].items()))})")
    errors = None
    if args.verify:
        start = time.perf_counter()
        errors = verify_written(path, sets, report, args.device)
        worst = max(errors, key=errors.get) if errors else None
        print(f"verify: {len(errors)} modules re-read, max rel error {errors[worst] if worst else 0.0:.3e}"
              + (f" ({worst})" if worst else "") + f", {time.perf_counter() - start:.1f} s")
    if args.metadata:
        write_report(args.metadata, fusion_metadata(report, plan.recipe(), errors), args.overwrite)
    as_dict = report.as_dict()
    if errors is not None:
        as_dict["verify"] = errors
    write_report(args.report, as_dict, args.overwrite)
    return 0
