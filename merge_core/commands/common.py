"""Arguments shared by every sub-command, so they read the same everywhere."""
from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from ..errors import MergeCoreError, NonFiniteError, OutputWriteError, finite_numbers
from ..files.atomic import atomic_write, refuse_existing
from ..files.tensor_source import PICKLE_OUTPUTS
from ..lowrank.rank_select import RankRule
from ..report import Report, size_text


def finite_float(text: str) -> float:
    """argparse type: a float that is neither NaN nor infinite."""
    try:
        return finite_numbers([text], "the value")[0]
    except (NonFiniteError, ValueError):
        raise argparse.ArgumentTypeError(f"not a finite number: {text!r}") from None


def path_text(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path")
    return text


def device_text(text: str) -> str:
    """argparse type: a device name, not empty (an empty shell variable would silently mean auto)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty device name; use auto, cpu, cuda or cuda:N")
    return text.strip()


def add_output(p: argparse.ArgumentParser, what: str, required: bool = True) -> None:
    """-o (`what` the output may be, for its help) and --overwrite."""
    p.add_argument("-o", "--output", required=required, type=path_text, help=what)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output (never by default)")


def output_path(path: Union[str, os.PathLike], fmt: Optional[str] = None) -> Path:
    """The file to write: .safetensors appended unless the name ends in it or, for a torch pickle, in
    .pt/.pth/.ckpt (so `style_v1.5` becomes style_v1.5.safetensors, what LoraLoader lists; the original
    scripts' rule).  `fmt` (extract and bake's --output-format) forces one: safetensors or pytorch (.pt)."""
    p = Path(path)
    is_pickle = p.suffix.lower() in PICKLE_OUTPUTS
    fmt = fmt or ("pytorch" if is_pickle else "safetensors")
    if fmt not in ("pytorch", "safetensors"):
        raise MergeCoreError(f"--output-format must be safetensors or pytorch, got {fmt!r}")
    if fmt == "pytorch" and not is_pickle:
        return p.with_name(p.name + ".pt")
    if fmt == "safetensors" and p.suffix.lower() != ".safetensors":
        return p.with_name(p.name + ".safetensors")
    return p


def add_device(p: argparse.ArgumentParser, default: str = "auto") -> None:
    p.add_argument("--device", default=default, type=device_text, help="auto (CUDA when present), cpu, cuda, cuda:N")


def add_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, metavar="N",
                   help="CPU threads: modules are computed this many side by side (default: torch's own, one per "
                        "core; 1 is faster on a busy machine); on a GPU, at most 4 of them, each on its own CUDA "
                        "stream")


MAX_THREADS = 1024  # far past any CPU's cores; a huge count makes the OS refuse threads and torch crash


def apply_threads(args: argparse.Namespace) -> None:
    """torch's thread count from --threads (the worker threads of a merge or fuse)."""
    if args.threads is not None:
        if not 1 <= args.threads <= MAX_THREADS:
            raise MergeCoreError(f"--threads must be between 1 and {MAX_THREADS}, got {args.threads}")
        torch.set_num_threads(args.threads)


def add_dtype(p: argparse.ArgumentParser, default: str = "fp16", flag: str = "--dtype") -> None:
    p.add_argument(flag, default=default, choices=["fp16", "float16", "bf16", "bfloat16", "fp32", "float32"],
                   help=f"output tensor dtype (default {default}); compute is always fp32")


def add_report(p: argparse.ArgumentParser) -> None:
    p.add_argument("--report", metavar="REPORT.json", help="write the per-module report as JSON")


def add_rank_rule(p: argparse.ArgumentParser, rank: Optional[int] = None, energy: float = 0.99,
                  min_rank: int = 4, max_rank: int = 32) -> None:
    g = p.add_argument_group("rank", "a fixed --rank, or dynamic: smallest rank keeping --energy of ‖ΔW‖² "
                                     "within [--min-rank, --max-rank]")
    g.add_argument("--rank", type=int, default=rank, help="fixed rank (overrides the energy rule)")
    g.add_argument("--energy", type=finite_float, default=energy, help=f"energy threshold on σ² (default {energy})")
    g.add_argument("--min-rank", type=int, help=f"default {min_rank}, or --max-rank when that is lower")
    g.add_argument("--max-rank", type=int, help=f"default {max_rank}, or --min-rank when that is higher")
    p.set_defaults(rank_bound_defaults=(min_rank, max_rank))


def rank_bounds(args: argparse.Namespace) -> tuple[int, int]:
    """(min, max) rank as given; an unset bound is its default moved to meet the other (--max-rank 2 alone
    gives 2..2, not a refusal of 4..2)."""
    low, high = args.rank_bound_defaults
    if args.min_rank is not None:
        low = args.min_rank
    elif args.max_rank is not None:
        low = min(low, args.max_rank)
    return low, (args.max_rank if args.max_rank is not None else max(high, low))


def rank_rule(args: argparse.Namespace) -> RankRule:
    return RankRule(args.rank, args.energy, *rank_bounds(args))


SIDE_FILES = ("report", "metadata")  # JSON written beside the output, after the work


def check_side_files(args: argparse.Namespace, output: Path, inputs: Sequence[str]) -> None:
    """Before any work: refuse a --report/--metadata path that is the output or an input or lies inside one
    (PEFT adapters are folders), that is the other side file or a folder, that exists without --overwrite, or
    whose folder cannot be written (the output would be written, then the JSON lost)."""
    taken = [Path(p).resolve() for p in (output, *inputs)]
    sides: list[Path] = []
    for flag in SIDE_FILES:
        path = getattr(args, flag, None)
        if not path:
            continue
        where = Path(path).resolve()
        if any(where == t or where.is_relative_to(t) for t in taken):
            raise MergeCoreError(f"--{flag} {path} is the output or an input, or inside one; give it a file of its own")
        if where in sides:
            raise MergeCoreError(f"--{flag} {path} is the other side file too; give each a file of its own")
        if where.is_dir():
            raise MergeCoreError(f"--{flag} {path} is a folder; give it a file name")
        refuse_existing(where, args.overwrite)
        folder = next((p for p in where.parents if p.exists()), None)
        if folder is not None and not (folder.is_dir() and os.access(folder, os.W_OK)):
            raise MergeCoreError(f"--{flag} {path}: cannot write in {folder}")
        sides.append(where)


def write_report(path: Optional[str], report: Union[dict, Report], overwrite: bool) -> None:
    """The report (or fuse's metadata) as JSON at `path`, after the output (nothing without a path: a Report is
    turned into a dict only when written).  A failed write says that the output stands."""
    if path:
        text = json.dumps(report.as_dict() if isinstance(report, Report) else report, indent=2, sort_keys=False)
        try:
            atomic_write(Path(path), lambda tmp: tmp.write_text(text), overwrite=overwrite)
        except OutputWriteError as exc:
            raise OutputWriteError(exc.failure, "The output was written; only this file is missing.") from None


SIZE_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
         "g": 10**9, "gb": 10**9, "gib": 2**30}


def parse_size(text: str) -> int:
    """'100MB' (10⁶), '64MiB' (2²⁰), '1.5GB', '123456' (bytes) -> bytes."""
    found = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = found.group(2).lower() if found else None
    if unit not in SIZE_UNITS:
        raise MergeCoreError(f"a size is a number with an optional unit (KB, MB, GB, KiB, MiB, GiB), got {text!r}")
    return int(float(found.group(1)) * SIZE_UNITS[unit])


def budget_line(summary: dict, path) -> str:
    """One line for the CLI: the target, the file as written, the ranks, and the energy kept against one rank
    for all modules in the same size."""
    size = path.stat().st_size if path.exists() else summary["file_bytes"]
    line = (f"size budget {size_text(summary['target_bytes'])}: {path.name} is {size_text(size)}; ranks "
            f"{summary['min_rank']}-{summary['max_rank']} (avg {summary['avg_rank']:.1f}); kept "
            f"{100 * summary['energy_kept']:.2f} % of the energy of {summary['energy_of']}")
    if summary["uniform_rank"] is not None:
        line += (f" (one rank for all modules in that size, {summary['uniform_rank']}, keeps "
                 f"{100 * summary['uniform_energy_kept']:.2f} %)")
    return line
