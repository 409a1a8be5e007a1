"""Extraction benchmark: randomized vs full SVD per SDXL layer shape, whole-SDXL extrapolation, and the peak
memory of a streaming extract (and bake) over a synthetic full-size SDXL checkpoint pair.

    python bench/extract_bench.py            # full run (several minutes; writes ~13 GB of temp files)
    python bench/extract_bench.py --quick    # small smoke run
    options: --unet-only (synthetic pair without text encoders), --no-streaming (parts 1-2 only), --tmp DIR,
             --device cpu|cuda, --rank N

Part 1 times one module's extraction both ways on a fine-tune-like ΔW (power-law spectrum σᵢ ∝ (i+1)^-0.8, full
rank): rSVD = merge_core's path (rank 32, oversampling 8, 2 power iterations, exact ‖ΔW‖²), full = the original
extractor's torch.linalg.svd(full_matrices=False) then truncation.  Errors are ‖ΔW − LoRA‖_F / ‖ΔW‖_F.
Part 2 extrapolates both to the 986 kohya LoRA-table modules (shape counts from merge_core's SDXL table).
Part 3 writes base and tuned checkpoints in the original SDXL layout with merge_core's streaming writer, runs
`extract` (and `bake` of the result) in a subprocess and reports its peak RSS (ru_maxrss, cross-checked with
/proc VmHWM), then deletes them.  It runs before parts 1-2 (printed last) so that the parent's own peak does
not leak into the children's ru_maxrss.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._common import sync  # noqa: E402
from merge_core.checkpoint.sdxl_checkpoint import sdxl_checkpoint_shapes  # noqa: E402
from merge_core.files.stream_writer import SafetensorsStream, header_bound  # noqa: E402
from merge_core.keys.sdxl_table import sdxl_modules  # noqa: E402
from merge_core.lowrank import Dense, RankRule, low_rank  # noqa: E402

SHAPES = [(640, 640), (1280, 1280), (5120, 640), (640, 2560), (10240, 1280), (1280, 5120), (640, 2048),
          (1280, 2048), (1280, 1280, 3, 3)]
TE_SHAPES = [(768, 768), (3072, 768), (768, 3072), (5120, 1280)]  # the rest of the table (text encoders)
QUICK_SHAPES = [(640, 640), (1280, 1280), (320, 320, 3, 3)]


def fine_tune_delta(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    out, n = shape[0], torch.Size(shape[1:]).numel()
    m = min(out, n)
    U, _ = torch.linalg.qr(torch.randn(out, m, generator=gen))
    V, _ = torch.linalg.qr(torch.randn(n, m, generator=gen))
    s = 0.02 * (torch.arange(m, dtype=torch.float32) + 1) ** -0.8
    return (U * s) @ V.T


def best_of(fn, repeat: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeat):
        sync()
        t = time.perf_counter()
        result = fn()
        sync()
        best = min(best, time.perf_counter() - t)
    return best, result


def per_shape(shapes, rank: int, device: torch.device, repeat: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    rows = {}
    print(f"\n1) one module, rank {rank}: randomized SVD (merge_core) vs full SVD (original extractor), {device}")
    print(f"{'shape':>20} {'rSVD s':>8} {'full s':>8} {'speedup':>8} {'rSVD err':>9} {'full err':>9} {'ratio':>7}")
    for shape in shapes:
        D = fine_tune_delta(shape, gen).to(device)
        t_r, lr = best_of(lambda: low_rank(Dense(D), RankRule(rank=rank), "rsvd", seed=1), repeat)
        err_r = lr.quality.rel_error

        def full():
            U, S, Vh = torch.linalg.svd(D, full_matrices=False)
            return U[:, :rank] * S[:rank], Vh[:rank]

        t_f, (up, down) = best_of(full, repeat)
        err_f = float((D - up @ down).norm() / D.norm())
        label = "x".join(map(str, shape))
        rows[tuple(shape)] = {"rsvd_s": t_r, "full_s": t_f, "rsvd_err": err_r, "full_err": err_f}
        print(f"{label:>20} {t_r:8.3f} {t_f:8.3f} {t_f / t_r:7.1f}x {err_r:9.5f} {err_f:9.5f} {err_r / err_f:7.4f}")
    return rows


def matrix(shape: tuple[int, ...]) -> tuple[int, int]:
    return shape[0], torch.Size(shape[1:]).numel()


def extrapolate(rows: dict) -> None:
    counts = Counter(matrix(s.shape) for s in sdxl_modules().values() if not s.locon)
    timed = {matrix(s): r for s, r in rows.items()}
    total_r = total_f = 0.0
    missing = []
    for shape, n in counts.items():
        if shape in timed:
            total_r += n * timed[shape]["rsvd_s"]
            total_f += n * timed[shape]["full_s"]
        else:
            missing.append(f"{shape[0]}x{shape[1]} ({n})")
    covered = sum(n for s, n in counts.items() if s in timed)
    print(f"\n2) whole SDXL LoRA table ({covered} of {sum(counts.values())} modules timed above; "
          "count × time per shape)")
    print(f"   randomized SVD: {total_r:8.1f} s    full SVD: {total_f:8.1f} s    "
          f"speedup {total_f / max(total_r, 1e-9):.1f}x")
    if missing:
        print("   not timed (not in the shape list): " + ", ".join(missing))


def synthetic_checkpoint(base_path: Path, tuned_path: Path, unet_only: bool, limit: int | None) -> int:
    """Write base and tuned SDXL checkpoints one tensor at a time (bounded memory); returns bytes per file."""
    shapes = sdxl_checkpoint_shapes(True, not unet_only)
    keys = list(shapes)[:limit] if limit else list(shapes)
    entries = [(k, shapes[k][1], shapes[k][0]) for k in keys]
    gen = torch.Generator().manual_seed(0)
    with open(base_path, "wb") as fb, open(tuned_path, "wb") as ft:
        wb, wt = SafetensorsStream(fb, header_bound(entries)), SafetensorsStream(ft, header_bound(entries))
        for key, dtype, shape in entries:
            if dtype == torch.int64:
                b = t = torch.arange(shape[-1]).reshape(shape)
            else:
                b = torch.randn(shape, generator=gen) * 0.02
                if len(shape) >= 2:
                    n = torch.Size(shape[1:]).numel()
                    t = b + (0.01 * torch.randn(shape[0], 8, generator=gen) @ torch.randn(8, n, generator=gen)
                             / n ** 0.5).reshape(shape)
                else:
                    t = b + 0.001 * torch.randn(shape, generator=gen)
            wb.add(key, b.to(dtype))
            wt.add(key, t.to(dtype))
        wb.finish({"bench": "synthetic SDXL base"})
        wt.finish({"bench": "synthetic SDXL tuned"})
    return base_path.stat().st_size


CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, {root!r})
import torch
from merge_core.lowrank import RankRule
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
if {op!r} == "extract":
    from merge_core.extract import extract_to_file
    rep = extract_to_file({a!r}, {b!r}, {out!r}, "bf16", rule=RankRule(rank={rank}), device={device!r})
    extra = {{"modules": len(rep.modules), "max_rel_error": rep.max_rel_error, "skipped": rep.extra["skipped"]}}
else:
    from merge_core.bake import bake_lora
    rep = bake_lora({a!r}, {b!r}, {out!r}, device={device!r})
    extra = {{"patched": rep["patched_keys"], "skipped": len(rep["skipped"])}}
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(json.dumps({{"seconds": time.perf_counter() - t, "import_rss_mb": rss0 / 1024, "vm_hwm_mb": hwm / 1024,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, **extra}}))
"""


def child(op: str, a: Path, b: Path, out: Path, rank: int, device: str) -> dict:
    code = CHILD.format(root=str(ROOT), op=op, a=str(a), b=str(b), out=str(out), rank=rank, device=device)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{op} subprocess failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def streaming(tmp: Path, unet_only: bool, limit: int | None, rank: int, device: str) -> list[str]:
    """Part 3, run first (see main) and returned as lines: generation, extract and bake each in a subprocess."""
    shapes = sdxl_checkpoint_shapes(True, not unet_only)
    keys = list(shapes)[:limit] if limit else list(shapes)
    size = sum(torch.Size(shapes[k][0]).numel() * torch.empty((), dtype=shapes[k][1]).element_size() for k in keys)
    need = 3 * size + (1 << 30)
    free = shutil.disk_usage(tmp).free
    what = "UNet" if unet_only else "UNet + CLIP-L + OpenCLIP-G"
    lines = [f"\n3) streaming run over a synthetic SDXL pair ({what}, {len(keys)} tensors, "
             f"{size / 2**30:.2f} GiB fp16 per file)"]
    if free < need:
        return lines + [f"   skipped: needs {need / 2**30:.1f} GiB free in {tmp}, {free / 2**30:.1f} GiB free"]
    work = Path(tempfile.mkdtemp(prefix="extract_bench_", dir=tmp))
    try:
        t = time.perf_counter()
        gen = [sys.executable, __file__, "--generate", str(work)] + (["--unet-only"] if unet_only else []) + \
            (["--limit", str(limit)] if limit else [])
        subprocess.run(gen, check=True)
        lines.append(f"   wrote base + tuned in {time.perf_counter() - t:.0f} s (in a subprocess; {work})")
        ex = child("extract", work / "base.safetensors", work / "tuned.safetensors", work / "lora.safetensors",
                   rank, device)
        lora_mb = (work / "lora.safetensors").stat().st_size / 2**20
        lines.append(f"   extract rank {rank}: {ex['seconds']:.0f} s, peak RSS {ex['peak_rss_mb']:.0f} MiB "
                     f"(ru_maxrss; VmHWM {ex['vm_hwm_mb']:.0f} MiB; after importing torch: "
                     f"{ex['import_rss_mb']:.0f} MiB), {ex['modules']} entries, LoRA {lora_mb:.0f} MiB, "
                     f"max rel error {ex['max_rel_error']:.3g}, not extracted {ex['skipped']}")
        bk = child("bake", work / "base.safetensors", work / "lora.safetensors", work / "baked.safetensors", rank,
                   device)
        lines.append(f"   bake of that LoRA: {bk['seconds']:.0f} s, peak RSS {bk['peak_rss_mb']:.0f} MiB "
                     f"(VmHWM {bk['vm_hwm_mb']:.0f} MiB), {bk['patched']} tensors patched, "
                     f"{bk['skipped']} modules skipped")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return lines + ["   temp files deleted"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small shapes, a 200-tensor UNet slice: a smoke run")
    ap.add_argument("--unet-only", action="store_true", help="synthetic pair without text encoders")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tmp", default=tempfile.gettempdir(), help="where the synthetic checkpoints go")
    ap.add_argument("--no-streaming", action="store_true", help="parts 1-2 only (no synthetic checkpoints)")
    ap.add_argument("--generate", metavar="DIR", help=argparse.SUPPRESS)  # internal: part 3's writer subprocess
    ap.add_argument("--limit", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.generate:
        synthetic_checkpoint(Path(args.generate) / "base.safetensors", Path(args.generate) / "tuned.safetensors",
                             args.unet_only, args.limit)
        return
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, device {device}")
    # Part 3 runs first: Linux keeps a process's ru_maxrss across fork+exec, so its subprocesses must start
    # from a parent that has not yet held the big matrices of part 1.
    part3 = [] if args.no_streaming else streaming(Path(args.tmp), args.unet_only or args.quick,
                                                   200 if args.quick else None, args.rank, args.device)
    rows = per_shape(QUICK_SHAPES if args.quick else SHAPES + TE_SHAPES, args.rank, device, 1 if args.quick else 3)
    extrapolate(rows)
    print("\n".join(part3))


if __name__ == "__main__":
    main()
