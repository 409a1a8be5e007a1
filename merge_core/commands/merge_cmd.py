"""`merge A [B ...] -o OUT`: merge LoRAs into one by rSVD (dynamic rank) or a conventional method, on the
target T = Σ wᵢΔWᵢ (each strength applied once, as stacking LoRAs in LoraLoader); `resize A -o OUT` is the
merge of one input."""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Optional, Sequence

from ..errors import MergeCoreError
from ..files.atomic import refuse_existing
from ..keys.profiles import PROFILES
from ..lora_file import dtype_of, load_lora
from ..lowrank import SOLVERS, RankRule
from ..merge import DORA_CHOICES, METHODS, REGISTRY, parse_block_weights
from ..merge.budget import budget_rule, fit_to_size
from ..merge.engine import collect, plan_merge
from ..merge.methods import method_named, resolve_weights
from ..merge.to_file import merge_to_file, streams_to, writes_folder
from .common import (add_device, add_dtype, add_output, add_rank_rule, add_report, add_threads, apply_threads,
                     budget_line, check_side_files, finite_float, output_path, parse_size, rank_bounds, write_report)
from .progress_line import ProgressLine

log = logging.getLogger(__name__)

METHOD_HELP = "; ".join(f"{m.name}: {m.summary}" for m in REGISTRY.values()) + (
    ". geometric_mean results vary between files with the same ΔW: it works on raw factors, and a LoRA's "
    "factors are not unique (B·A = (B·M)(M⁻¹·A) for any invertible M)")
WEIGHTS_HELP = ("one weight per input: T = Σ wᵢΔWᵢ (default 1/N each for rsvd and weighted_avg, 1.0 each for the "
                "others; negative values subtract)")
SOLVER_HELP = ("rsvd: randomized SVD on the factors (exact Gram core when the stacked rank is small); exact: QR-core "
               "SVD of the factors; dense: kohya-style full SVD of the dense ΔW (slow, for comparison). Default: rsvd "
               "for rsvd/ties/dare/dare_ties, exact for svd/weighted_avg; not used by concat/geometric_mean")
BLOCKS_HELP = ("block weights per input (one list for all, or one per input; '-' = none). SDXL: 20 values "
               "BASE,IN00..IN08,MID,OUT00..OUT08, or the 12-value form BASE,IN04,IN05,IN07,IN08,MID,OUT00..OUT05 "
               "(blocks it leaves out get 0, as in LoRA Block Weight); Flux.1: 58 values BASE,D00..D18,S00..S37 "
               "(BASE = text encoders and the layers outside the blocks); or BLOCK=VALUE pairs, the rest 1: "
               "'IN=0,OUT00-OUT02=0.5' (SDXL), 'D=0.5,S20-S37=0' (Flux, also past Flux.1's blocks); a list that "
               "starts with a minus sign needs --block-weights=-1,...")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge", help="merge LoRAs: rSVD with dynamic rank, or svd/weighted_avg/concat/"
                                     "geometric_mean/ties/dare/dare_ties; one input: resize it",
                       description="Merge LoRAs module by module on T = Σ wᵢΔWᵢ; the output is a LoRA/LoCon with "
                                   "alpha = rank (kohya names for SDXL). One input resizes it: T is its own ΔW, "
                                   "re-factored at the ranks the options choose (LoHa/LoKr inputs become LoRAs).")
    p.add_argument("inputs", nargs="+", metavar="LORA",
                   help="one or more LoRA/LoCon/LoHa/LoKr files (.safetensors/.pt) or PEFT folders: kohya, "
                        "diffusers/PEFT names, any ranks")
    add_options(p)
    r = sub.add_parser("resize", help="resize one LoRA/LoCon/LoHa/LoKr to a LoRA of new ranks (merge of one input)",
                       description="Re-factor one LoRA as a LoRA/LoCon with alpha = rank: per module the best "
                                   "approximation of its ΔW at the rank the options choose (--rank, the energy "
                                   "rule, or --target-size); LoHa/LoKr inputs become LoRAs. The same as `merge` "
                                   "with one input; `inspect FILE --ranks` shows beforehand what each choice keeps.")
    r.add_argument("inputs", nargs=1, metavar="LORA", help="a LoRA/LoCon/LoHa/LoKr file (.safetensors/.pt) or a "
                                                           "PEFT folder")
    add_options(r)


def add_options(p: argparse.ArgumentParser) -> None:
    """Every option of merge (and resize) after the inputs."""
    p.add_argument("--method", choices=METHODS, default="rsvd", help=METHOD_HELP)
    p.add_argument("--weights", type=finite_float, nargs="+", metavar="W", help=WEIGHTS_HELP)
    add_rank_rule(p)
    p.set_defaults(energy=None)  # no rank option -> the method's own default rule
    p.add_argument("--target-size", metavar="SIZE",
                   help="choose each module's rank (within --min-rank/--max-rank) to keep the most of the network's "
                        "energy in a .safetensors file (or a PEFT folder's weights) of at most SIZE (e.g. 100MB, "
                        "64MiB); not for concat or geometric_mean")
    p.add_argument("--solver", choices=SOLVERS, help=SOLVER_HELP)
    p.add_argument("--density", type=finite_float, default=0.5,
                   help="ties: share of entries kept per input; dare, dare_ties: keep probability 1-p (default 0.5)")
    p.add_argument("--block-weights", nargs="+", metavar="W1,W2,...", help=BLOCKS_HELP)
    p.add_argument("--seed", type=int, default=0, help="seed of the randomized sketch and of dare's masks (default 0)")
    p.add_argument("--profile", choices=[x for x in PROFILES if x != "custom"], default="auto",
                   help="how to read the inputs' names (default auto)")
    p.add_argument("--dora", choices=DORA_CHOICES, default="error",
                   help="DoRA inputs: error (default) or ignore (merge the low-rank part, drop the magnitude)")
    add_threads(p)
    add_device(p)
    add_dtype(p)
    add_output(p, "output: a .safetensors (appended if missing) or .pt/.pth/.ckpt file, or a folder for PEFT "
                  "inputs (written as a PEFT adapter)")
    add_report(p)
    p.set_defaults(run=run)


def rule_from(args: argparse.Namespace) -> Optional[RankRule]:
    """None when no rank option was given (the method decides), else the rule they describe."""
    if args.rank is None and args.energy is None and args.min_rank is None and args.max_rank is None:
        return None
    return RankRule(args.rank, RankRule().energy if args.energy is None else args.energy, *rank_bounds(args))


def block_weights_from(specs: Optional[Sequence[str]], n: int) -> Optional[list]:
    if not specs:
        return None
    if len(specs) not in (1, n):
        raise MergeCoreError(f"--block-weights takes one list for all inputs or one per input ({n}), got {len(specs)}")
    parsed = [parse_block_weights(s) for s in specs]
    return parsed * n if len(parsed) == 1 else parsed


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    method = method_named(args.method)
    resolve_weights(method, len(args.inputs), args.weights)  # count mismatch fails before any file is read
    blocks = block_weights_from(args.block_weights, len(args.inputs))
    rule = rule_from(args)
    if rule is not None and method.solver is None:
        log.warning("rank options do not apply to %s (its rank follows from the inputs); ignored", method.name)
    if args.solver is not None and method.solver is None:
        log.warning("--solver does not apply to %s (exact, no SVD); ignored", method.name)
    if args.target_size is not None and args.energy is not None:
        log.warning("--energy does not apply with --target-size (the budget chooses the ranks); ignored")
    apply_threads(args)
    out = Path(args.output)
    refuse_existing(out, args.overwrite, args.inputs)
    check_side_files(args, out, args.inputs)  # before reading (again below if a bare -o gains .safetensors)
    # each file's sha256 (for the recipe) is hashed on a spare core from now on, beside the parsing and the merge
    sets = [load_lora(p, profile=args.profile, digest=True) for p in args.inputs]

    if args.target_size is not None:
        rule = budget_rule(rule)
    plan = plan_merge(sets, args.method, args.weights, rule, args.solver, args.seed, args.density, blocks, args.dora)
    named = output_path(out)
    # a name without a file suffix gets .safetensors, unless an input was a PEFT folder (then it names one)
    if not (writes_folder(out, plan) and plan.layout[2] is not None) and named != out:
        out = named
        refuse_existing(out, args.overwrite, args.inputs)
        check_side_files(args, out, args.inputs)
    budget = None
    if args.target_size is not None:
        if not streams_to(out, plan):
            raise MergeCoreError(f"--target-size sizes a .safetensors file or a PEFT folder, not {out.name}")
        with ProgressLine("size budget: spectra") as line:
            budget = fit_to_size(plan, parse_size(args.target_size), args.dtype, out.stem, args.device, line)
    with ProgressLine(f"merge ({args.method})") as line:
        def progress(done: int, total: int, name: str) -> None:
            for s in sets:  # a merged module's inputs are not needed again: free them as the outputs grow
                s.modules.pop(name, None)
            line(done, total, name)

        if streams_to(out, plan):
            report = merge_to_file(plan, out, args.dtype, args.overwrite, args.device, progress)
        else:
            plan.parameters["dtype"] = args.dtype
            result = collect(plan, args.device, progress, hold_dtype=dtype_of(args.dtype))
            result.save(out, dtype=args.dtype, overwrite=args.overwrite)
            report = result.report
    report.extra["total_seconds"] = time.perf_counter() - start
    print(report.table())
    if budget is not None:
        report.extra["size_budget"] = budget
        print(budget_line(budget, out))
    written = sum(m.kind != "none" for m in report.modules)
    left_out = len(report.modules) - written
    print(f"wrote {out} ({written} module{'s' * (written != 1)}, method {args.method}"
          + (f"; {left_out} with a zero result left out" if left_out else "") + ")")
    write_report(args.report, report, args.overwrite)
    return 0
