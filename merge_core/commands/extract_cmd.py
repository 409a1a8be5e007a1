"""`extract --source-model BASE --target-model TUNED -o OUT`: a LoRA of the difference of two models
(randomized SVD per layer, streamed), with the original extractor's flags and defaults (rank 32, bf16)."""
from __future__ import annotations

import argparse
import logging

from ..checkpoint.sources import KINDS
from ..extract import DEFAULT_RANK, extract_to_file
from ..lowrank.rank_select import RankRule
from .common import (add_device, add_dtype, add_output, add_rank_rule, add_report, budget_line, check_side_files,
                     finite_float, output_path, parse_size, rank_bounds, write_report)
from .progress_line import ProgressLine

log = logging.getLogger(__name__)
ENERGY_DEFAULT = 0.99


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("extract", help="extract a LoRA from a base and a fine-tuned model",
                       description="Extract a LoRA (kohya names) from BASE and TUNED: ΔW = TUNED − BASE per layer, "
                                   "randomized SVD, one layer in memory at a time. Rank: fixed --rank "
                                   f"(default {DEFAULT_RANK}), or give --energy for the dynamic rule.")
    p.add_argument("--source-model", required=True, metavar="BASE", help="base model: .safetensors, folder of "
                   "shards, or .pt/.pth/.ckpt (read with weights_only)")
    p.add_argument("--source-type", default="auto", choices=KINDS, help="format of BASE (default: by file name)")
    p.add_argument("--target-model", required=True, metavar="TUNED", help="fine-tuned model, same formats")
    p.add_argument("--target-type", default="auto", choices=KINDS, help="format of TUNED (default: by file name)")
    add_rank_rule(p, rank=None, energy=None)  # bounds given: they turn the dynamic rule on
    for action in p._actions:
        if "--energy" in action.option_strings:
            action.help = (f"dynamic rank: keep this share of ‖ΔW‖² (default {ENERGY_DEFAULT} when --min-rank or "
                           f"--max-rank is given); without any of them the rank is fixed (--rank, default "
                           f"{DEFAULT_RANK})")
    p.add_argument("--target-size", metavar="SIZE",
                   help="choose each layer's rank (within --min-rank/--max-rank) to keep the most of the model's "
                        "‖ΔW‖² in a .safetensors file of at most SIZE (e.g. 128MB, 64MiB); the models are read once, "
                        "every layer factored at --max-rank first")
    p.add_argument("--conv-rank", type=int, help="rank of 3×3 conv layers (LoCon); default: as --rank "
                   "(under --energy: their max rank)")
    p.add_argument("--diff-only", action="store_true", help="store every changed tensor as a full .diff (no SVD)")
    p.add_argument("--min-diff", type=finite_float, default=0.0, metavar="EPS",
                   help="skip tensors with max |ΔW| <= EPS as unchanged (default 0: only identical ones)")
    p.add_argument("--text-encoders", action=argparse.BooleanOptionalAction, default=True,
                   help="extract the text encoders too (default on)")
    add_dtype(p, default="bf16", flag="--output-dtype")
    p.add_argument("--output-format", choices=["safetensors", "pytorch"],
                   help="default: pytorch for -o *.pt/.pth/.ckpt, else safetensors (suffix appended if missing)")
    p.add_argument("--seed", type=int, default=0, help="seed of the randomized SVD sketches (default 0)")
    add_device(p)
    add_report(p)
    add_output(p, "output file (.safetensors, or .pt/.pth/.ckpt; a missing suffix is added per --output-format)")
    p.set_defaults(run=run)


def rule_of(args: argparse.Namespace) -> RankRule:
    """--rank N fixed; --energy T dynamic within [--min-rank, --max-rank] (bounds alone: at energy 0.99, as
    merge does); none of them: fixed rank 32.  With --target-size: the bounds, the ranks come from the budget;
    --diff-only uses none of them."""
    bounded = args.min_rank is not None or args.max_rank is not None
    if args.diff_only:
        if args.rank is not None or args.energy is not None or bounded:
            log.warning("rank options do not apply to --diff-only (changed tensors are stored whole); ignored")
        return RankRule(rank=DEFAULT_RANK)
    bounds = rank_bounds(args)
    dynamic = RankRule(None, ENERGY_DEFAULT if args.energy is None else args.energy, *bounds)  # checks them all
    if args.target_size is not None and args.rank is None:  # with a --rank, extract_to_file refuses the pair
        if args.energy is not None:
            log.warning("--energy does not apply with --target-size (the budget chooses the ranks); ignored")
        return RankRule(None, ENERGY_DEFAULT, *bounds)
    if args.rank is not None:
        for given, what in ((args.energy is not None, "--energy"), (bounded, "--min-rank/--max-rank")):
            if given:
                log.warning("both --rank and %s given: using the fixed rank %d", what, args.rank)
        return RankRule(rank=args.rank)
    if args.energy is None and not bounded:
        return RankRule(rank=DEFAULT_RANK)
    return dynamic


def run(args: argparse.Namespace) -> int:
    out = output_path(args.output, args.output_format)
    check_side_files(args, out, [args.source_model, args.target_model])
    with ProgressLine("extract") as progress:
        report = extract_to_file(args.source_model, args.target_model, out, output_dtype=args.output_dtype,
                                 overwrite=args.overwrite, rule=rule_of(args), conv_rank=args.conv_rank,
                                 diff_only=args.diff_only, min_diff=args.min_diff, text_encoders=args.text_encoders,
                                 device=args.device, seed=args.seed, progress=progress, base_kind=args.source_type,
                                 tuned_kind=args.target_type,
                                 target_size=parse_size(args.target_size) if args.target_size else None)
    print(report.table())
    skipped = report.extra.get("skipped", {})
    if skipped:
        print("not extracted: " + ", ".join(f"{reason} {n}" for reason, n in sorted(skipped.items())))
    if "size_budget" in report.extra:
        print(budget_line(report.extra["size_budget"], out))
    print(f"wrote {out}")
    write_report(args.report, report, args.overwrite)
    return 0
