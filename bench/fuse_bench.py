"""LoKr/LoHa fusion on SDXL-size files: time, peak memory and exact error per strategy and output form.

Generates, in a temp folder, two SDXL LoKr files (all 986 modules, w1 8×8 full, w2 (out/8)×(in/8) at rank 16,
α 8) and two SDXL LoHa files (all 986 modules, rank 16, α 8), seeded.  Each run is the real CLI,
`python -m merge_core fuse A B --strategy S --output-format F --report R -o OUT`, in a child process, so the
wall time includes loading and writing, and the peak RSS (os.wait4's ru_maxrss) is that run's alone.
Error columns come from the run's report: per module ‖T − written‖/‖T‖ against the exact fused delta
(max and median over modules) and the lowest kept energy.

    python bench/fuse_bench.py [--quick] [--device cpu|cuda|auto] [--threads N] [--verify] [--keep DIR]

Table 1, all 986 modules, smart_fusion (the default): LoKr pair as lokr, lora, auto; a LoKr pair whose w1 are
equal up to scale (w2 full: the nearest Kronecker product is exact) as lokr and auto; LoHa pair as lora (LoHa
has no Kronecker form, so its lokr/auto runs fall back to lora per module: the same work, shown in table 2).
Table 2, every --stride-th module (50 of 986 by default, same factor sizes), so the 40 runs fit in minutes and
the dense `full` files stay small (all 986 modules as full diffs are 2.9 G entries: a 5.9 GB fp16 file): every
strategy × every output form, both pairs.
--quick: 30 modules at rank 4 for both tables, for a smoke run.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._common import md_table  # noqa: E402
from merge_core.fuse import OUTPUT_FORMATS, STRATEGIES  # noqa: E402
from merge_core.keys.sdxl_table import sdxl_modules  # noqa: E402

FACTOR, RANK, ALPHA = 8, 16, 8.0
# Linux carries a process's RSS high-water mark across fork/exec, so a child of this (large) process would
# report at least our RSS: each run is forked from this small launcher instead, which prints the run's peak.
LAUNCHER = ("import os, sys\npid = os.fork()\nif pid == 0:\n    os.execv(sys.executable, [sys.executable] + sys.argv[2:])\n"
            "_, status, usage = os.wait4(pid, 0)\nopen(sys.argv[1], 'w').write(str(usage.ru_maxrss))\n"
            "sys.exit(os.waitstatus_to_exitcode(status))")


def module_specs(stride: int) -> list:
    return [s for s in sdxl_modules().values() if not s.locon][::stride]


def lokr_file(path: Path, specs: list, rank: int, seed: int, shared_w1: float = 0.0) -> Path:
    """LoKr with w2 at `rank`; or, with shared_w1 ≠ 0, w1 = shared_w1 × a w1 common to all such files and w2 full."""
    gen, common, sd = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(0), {}
    for s in specs:
        out, inn = s.shape
        if shared_w1:
            sd[f"{s.name}.lokr_w1"] = torch.randn(FACTOR, FACTOR, generator=common) * 0.5 * shared_w1
            sd[f"{s.name}.lokr_w2"] = torch.randn(out // FACTOR, inn // FACTOR, generator=gen) * 0.01
            continue
        sd[f"{s.name}.lokr_w1"] = torch.randn(FACTOR, FACTOR, generator=gen) * 0.5
        sd[f"{s.name}.lokr_w2_a"] = torch.randn(out // FACTOR, rank, generator=gen) * 0.05
        sd[f"{s.name}.lokr_w2_b"] = torch.randn(rank, inn // FACTOR, generator=gen) * 0.05
        sd[f"{s.name}.alpha"] = torch.tensor(ALPHA)
    save_file({k: v.half() if v.ndim else v for k, v in sd.items()}, str(path))
    return path


def loha_file(path: Path, specs: list, rank: int, seed: int) -> Path:
    gen, sd = torch.Generator().manual_seed(seed), {}
    for s in specs:
        out, inn = s.shape
        for branch in ("w1", "w2"):
            sd[f"{s.name}.hada_{branch}_a"] = torch.randn(out, rank, generator=gen) * 0.1
            sd[f"{s.name}.hada_{branch}_b"] = torch.randn(rank, inn, generator=gen) * 0.1
        sd[f"{s.name}.alpha"] = torch.tensor(ALPHA)
    save_file({k: v.half() if v.ndim else v for k, v in sd.items()}, str(path))
    return path


def run_fuse(inputs: list[Path], strategy: str, form: str, out_dir: Path, args) -> list:
    """One CLI run in a child: [seconds, peak MiB, max err, median err, min energy, MiB written, kinds]."""
    tag = f"{inputs[0].stem}_{strategy}_{form}"
    out, report = out_dir / f"{tag}.safetensors", out_dir / f"{tag}.json"
    peak = out_dir / f"{tag}.maxrss"
    cmd = [sys.executable, "-c", LAUNCHER, str(peak), "-m", "merge_core", "fuse", *map(str, inputs), "--strategy", strategy,
           "--output-format", form, "--device", args.device, "--report", str(report), "-o", str(out), "--overwrite"]
    if args.verify:
        cmd.append("--verify")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads)) if args.threads else None
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[4:])} failed: {proc.stderr.decode()[-2000:]}")
    rep = json.loads(report.read_text())
    errs = [m["rel_error"] for m in rep["modules"]]
    row = [f"{seconds:.1f}", f"{int(peak.read_text()) / 1024:.0f}", f"{max(errs):.2e}", f"{statistics.median(errs):.2e}",
           f"{min(m['energy_kept'] for m in rep['modules']):.4f}", f"{out.stat().st_size / 2**20:.1f}",
           " ".join(f"{k}:{v}" for k, v in sorted(rep["kinds"].items()))]
    if args.verify:
        row.append(f"{max(rep['verify'].values()):.2e}")
    out.unlink()
    return row


def make_pairs(work: Path, specs: list, rank: int, tag: str) -> dict[str, list[Path]]:
    return {"LoKr": [lokr_file(work / f"lokr{tag}_{i}.safetensors", specs, rank, 10 + i) for i in (1, 2)],
            "LoHa": [loha_file(work / f"loha{tag}_{i}.safetensors", specs, rank, 20 + i) for i in (1, 2)]}


def run_table(title: str, pairs: dict[str, list[Path]], plan: list[tuple[str, str, str]], work: Path, args) -> None:
    headers = ["inputs", "strategy", "form", "seconds", "peak MiB", "max err", "median err", "min energy",
               "out MiB", "written kinds"] + (["verify max err (fp16)"] if args.verify else [])
    print(f"## {title}", flush=True)
    rows = []
    for kind, strategy, form in plan:
        rows.append([kind, strategy, form] + run_fuse(pairs[kind], strategy, form, work, args))
        print("  " + " | ".join(rows[-1]), flush=True)
    print("\n" + md_table(headers, rows) + "\n", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="30 modules at rank 4 (smoke run)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS for the runs (default: torch's)")
    ap.add_argument("--stride", type=int, default=20, help="table 2 uses every N-th SDXL module (default 20)")
    ap.add_argument("--verify", action="store_true", help="also reload each output (fp16) and report its error")
    ap.add_argument("--keep", metavar="DIR", help="generate into DIR and keep the files")
    ap.add_argument("--skip-full-table", action="store_true", help="only table 2")
    args = ap.parse_args()
    rank = 4 if args.quick else RANK
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="fuse_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    all_specs, sub_specs = module_specs(33 if args.quick else 1), module_specs(33 if args.quick else args.stride)
    start = time.perf_counter()
    full_pairs = make_pairs(work, all_specs, rank, "_all")
    full_pairs["LoKr shared w1"] = [lokr_file(work / f"lokr_w1_{i}.safetensors", all_specs, rank, 30 + i, f)
                                    for i, f in ((1, 1.0), (2, -0.5))]
    sub_pairs = make_pairs(work, sub_specs, rank, "_sub")
    size = {k: v[0].stat().st_size / 2**20 for k, v in full_pairs.items()}
    print(f"# fuse bench: SDXL LoKr (w1 {FACTOR}x{FACTOR}, w2 rank {rank}, {size['LoKr']:.1f} MiB/file) and LoHa "
          f"(rank {rank}, {size['LoHa']:.1f} MiB/file), fp16 inputs, {len(all_specs)} modules (table 1) / "
          f"{len(sub_specs)} (table 2), generated in {time.perf_counter() - start:.1f} s; device {args.device}, "
          f"torch threads {args.threads or torch.get_num_threads()}, {os.cpu_count()} CPUs\n", flush=True)
    if not args.skip_full_table:
        plan = [("LoKr", "smart_fusion", f) for f in ("lokr", "lora", "auto")]
        plan += [("LoKr shared w1", "smart_fusion", f) for f in ("lokr", "auto")]
        plan += [("LoHa", "smart_fusion", "lora")]
        run_table(f"table 1: all {len(all_specs)} modules, smart_fusion", full_pairs, plan, work, args)
    plan = [(kind, s, f) for kind in sub_pairs for s in STRATEGIES for f in OUTPUT_FORMATS]
    run_table(f"table 2: {len(sub_specs)} modules (every {args.stride}th), every strategy and form", sub_pairs,
              plan, work, args)
    print("errors are exact, per module, against T = Σ cᵢ ΔWᵢ (fp32, before the fp16 cast); 'full' is exact by "
          "construction (0); lora uses the fuse default rule (99.9 % energy, ranks 4..128); peak MiB is the "
          "child's ru_maxrss")


if __name__ == "__main__":
    main()
