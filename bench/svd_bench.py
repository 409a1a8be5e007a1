"""Exact factored SVD vs dense SVD vs randomized SVD on SDXL module shapes.

The target is a stacked sum of LoRAs, T = U V with inner rank R (Factored), whose singular values decay
geometrically from 1 to --sigma-min; each solver truncates it to rank k (default k = R/2) through
merge_core.lowrank.low_rank, which is what merge/fuse run per module. Reported per (shape, R):
  - median wall time of low_rank(..., solver) for "exact" (QR core), "dense" (thin SVD of U@V), "rsvd";
  - speed-up of exact and rsvd over dense;
  - optimal rank-k error  e* = sqrt(Σ_{i>k} σᵢ²) / ‖T‖  from the dense SVD's σ, and each solver's
    ‖T − up·down‖_F / ‖T‖_F (computed densely in fp64 here, independently of merge_core's trace formula) / e*;
  - max_i |σᵢ(exact) − σᵢ(dense)| / σ₁ over the R non-zero values.
Then the estimated time for all 986 SDXL LoRA modules per method and R (module counts per shape from
merge_core.keys.sdxl_table; the text-encoder shapes are benchmarked too so the total covers every module).

    python bench/svd_bench.py [--quick] [--device cpu|cuda|auto] [--threads N] [--k K]
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import decaying_factors, md_table, timeit  # noqa: E402
from merge_core.device import resolve_device  # noqa: E402
from merge_core.lowrank import Factored, LowRank, RankRule, low_rank  # noqa: E402

# (out, in) matrix shapes: the eight SDXL UNet shapes, then the text-encoder ones (for the 986 total)
UNET_SHAPES = [(640, 640), (1280, 1280), (5120, 640), (640, 2560), (10240, 1280), (1280, 5120),
               (640, 2048), (1280, 2048)]
TE_SHAPES = [(768, 768), (3072, 768), (768, 3072), (5120, 1280)]
QUICK_SHAPES = [(640, 640), (1280, 2048)]
RANKS = [16, 32, 64, 128]
QUICK_RANKS = [16, 32]
SOLVERS = ("exact", "dense", "rsvd")
SLOW_S = 0.5  # a first call slower than this is timed once (keeps the big dense SVDs to a few minutes)

# kohya SDXL LoRA module counts per (out, in), used only if merge_core/data/sdxl_modules.json is missing
KNOWN_COUNTS = {(1280, 1280): 500, (1280, 2048): 120, (640, 640): 70, (10240, 1280): 60, (1280, 5120): 92,
                (768, 768): 48, (5120, 1280): 32, (640, 2048): 20, (3072, 768): 12, (768, 3072): 12,
                (5120, 640): 10, (640, 2560): 10}


def module_counts() -> tuple[Counter, str]:
    """Number of standard (non-LoCon) SDXL LoRA modules per matrix shape, and where the counts came from."""
    try:
        from merge_core.keys.sdxl_table import sdxl_modules

        specs = [s for s in sdxl_modules().values() if not s.locon]
        return Counter(s.matrix_shape for s in specs), "merge_core.keys.sdxl_table"
    except (ImportError, OSError, ValueError, KeyError) as exc:
        return Counter(KNOWN_COUNTS), f"built-in counts (table unavailable: {exc})"


def timed(fn: Callable[[], LowRank]) -> tuple[float, LowRank]:
    """Seconds per call and the result: median of 3 after one warm-up, or the single first call if slow."""
    held: list[LowRank] = []
    first = timeit(lambda: held.append(fn()), repeats=1, warmup=0)
    if first > SLOW_S:
        return first, held[0]
    return timeit(fn, repeats=3, warmup=0), held[0]


def rel_residual(T: torch.Tensor, lr: LowRank, norm_t: float) -> float:
    """‖T − up·down‖_F / ‖T‖_F, densely in fp64 (an fp32 norm over millions of entries is off by ~1e-4)."""
    return float(torch.linalg.matrix_norm(T - lr.up.double() @ lr.down.double())) / norm_t


def bench_case(out: int, inn: int, R: int, k: int, sigma_min: float, device: torch.device) -> dict:
    """Time and score the three solvers on one factored target of shape out×inn and inner rank R."""
    U, V = decaying_factors(out, inn, R, decay=sigma_min ** (1.0 / (R - 1)), seed=out * 7 + inn * 3 + R)
    op = Factored(U.to(device), V.to(device))
    rule = RankRule(rank=k)
    times, results = {}, {}
    for solver in SOLVERS:
        times[solver], results[solver] = timed(lambda s=solver: low_rank(op, rule, solver=s, seed=0))
    s_dense = results["dense"].singular_values.double().cpu()
    norm_t = float(s_dense.square().sum().sqrt())
    optimal = float(s_dense[k:].square().sum().sqrt()) / norm_t
    T = op.U.double() @ op.V.double()
    ratios = {s: rel_residual(T, results[s], norm_t) / optimal for s in SOLVERS}
    s_exact = results["exact"].singular_values.double().cpu()
    d_sigma = float((s_exact[:R] - s_dense[:R]).abs().max() / s_dense[0])
    return {"times": times, "optimal": optimal, "ratios": ratios, "d_sigma": d_sigma}


def row(out: int, inn: int, R: int, k: int, r: dict) -> list[str]:
    t = r["times"]
    return [f"{out}×{inn}", R, k, *(f"{t[s] * 1e3:.2f}" for s in SOLVERS),
            f"{t['dense'] / t['exact']:.1f}×", f"{t['dense'] / t['rsvd']:.1f}×", f"{r['optimal']:.4f}",
            *(f"{r['ratios'][s]:.6f}" for s in SOLVERS), f"{r['d_sigma']:.1e}"]


HEADERS = ["shape", "R", "k", "exact ms", "dense ms", "rsvd ms", "exact speed-up", "rsvd speed-up",
           "optimal err", "exact err/opt", "dense err/opt", "rsvd err/opt", "max|Δσ|/σ₁ exact−dense"]


def totals(results: dict, counts: Counter, ranks: list[int]) -> list[str]:
    """Per R: Σ over benchmarked shapes of module count × time, per solver."""
    lines = []
    total_modules = sum(counts.values())
    for R in ranks:
        covered = [(shape, counts[shape]) for shape in counts if (shape, R) in results]
        n = sum(c for _, c in covered)
        parts = [f"{s} {sum(c * results[(shape, R)]['times'][s] for shape, c in covered):.2f} s" for s in SOLVERS]
        scope = f"all {n}" if n == total_modules else f"{n} of {total_modules} (benchmarked shapes only)"
        lines.append(f"R={R}: estimated time for {scope} SDXL modules: " + ", ".join(parts))
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="two shapes, R = 16, 32 (smoke run)")
    ap.add_argument("--device", default="auto", choices=["cpu", "cuda", "auto"])
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--k", type=int, default=None, help="truncation rank (default R/2)")
    ap.add_argument("--sigma-min", type=float, default=1e-2, help="smallest singular value (σ₁ = 1)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    counts, counts_source = module_counts()
    shapes = QUICK_SHAPES if args.quick else UNET_SHAPES + TE_SHAPES
    ranks = QUICK_RANKS if args.quick else RANKS

    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}; fp32; "
          f"σᵢ geometric from 1 to {args.sigma_min:g} over R; k = {args.k or 'R/2'}; "
          f"rsvd oversample 8, power iters 2, seed 0; times: median of 3 after a warm-up "
          f"(single call when > {SLOW_S} s); errors: dense residual / optimal rank-k error")
    rows, results = [], {}
    for out, inn in shapes:
        for R in ranks:
            k = min(args.k, R) if args.k else R // 2
            results[((out, inn), R)] = r = bench_case(out, inn, R, k, args.sigma_min, device)
            rows.append(row(out, inn, R, k, r))
            print(f"  done {out}×{inn} R={R}", file=sys.stderr, flush=True)
    print(md_table(HEADERS, rows))
    print(f"\nmodule counts per shape from {counts_source} ({sum(counts.values())} modules):")
    for line in totals(results, counts, ranks):
        print(line)


if __name__ == "__main__":
    main()
