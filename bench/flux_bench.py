"""Merging a Flux LoRA named the sd-scripts way with one named the AI-Toolkit (diffusers) way, full size.

Makes both inputs (random factors, fp16, Flux.1's 19 double and 38 single blocks, hidden 3072): the sd-scripts
one on every block linear (fused qkv and linear1), the AI-Toolkit one on its usual targets (q, k, v, the
context's, the outputs, the MLPs; proj_mlp and proj_out in single blocks).  Each method runs as a CLI process of
its own; the table gives the modules written, how many came from both inputs, the merge's own seconds (its
report), the process's wall seconds (torch's import included) and peak RSS.  Not a timed test.

    python bench/flux_bench.py [--rank 16] [--methods rsvd concat] [--workdir DIR]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench._common import child_peak_mb, md_table  # noqa: E402

HIDDEN, MLP, DOUBLE, SINGLE = 3072, 12288, 19, 38


def kohya_modules() -> dict[str, tuple[int, int]]:
    """sd-scripts' module names -> (out, in)."""
    h, m = HIDDEN, MLP
    out = {}
    for i in range(DOUBLE):
        for s in ("img", "txt"):
            out.update({f"double_blocks_{i}_{s}_attn_qkv": (3 * h, h), f"double_blocks_{i}_{s}_attn_proj": (h, h),
                        f"double_blocks_{i}_{s}_mlp_0": (m, h), f"double_blocks_{i}_{s}_mlp_2": (h, m),
                        f"double_blocks_{i}_{s}_mod_lin": (6 * h, h)})
    for i in range(SINGLE):
        out.update({f"single_blocks_{i}_linear1": (3 * h + m, h), f"single_blocks_{i}_linear2": (h, h + m),
                    f"single_blocks_{i}_modulation_lin": (3 * h, h)})
    return {"lora_unet_" + k: v for k, v in out.items()}


def diffusers_modules() -> dict[str, tuple[int, int]]:
    """AI-Toolkit's usual targets -> (out, in)."""
    h, m = HIDDEN, MLP
    out = {}
    for i in range(DOUBLE):
        b = f"transformer_blocks.{i}."
        for p in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "to_out.0"):
            out[b + "attn." + p] = (h, h)
        out.update({b + "ff.net.0.proj": (m, h), b + "ff.net.2": (h, m), b + "ff_context.net.0.proj": (m, h),
                    b + "ff_context.net.2": (h, m)})
    for i in range(SINGLE):
        b = f"single_transformer_blocks.{i}."
        out.update({b + "attn.to_q": (h, h), b + "attn.to_k": (h, h), b + "attn.to_v": (h, h),
                    b + "proj_mlp": (m, h), b + "proj_out": (h, h + m)})
    return {"transformer." + k: v for k, v in out.items()}


def write(path: Path, modules: dict[str, tuple[int, int]], rank: int, kohya: bool, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, (out, inn) in modules.items():
        up = (torch.randn(out, rank, generator=g) * 0.01).half()
        down = (torch.randn(rank, inn, generator=g) * 0.01).half()
        if kohya:
            sd.update({f"{name}.lora_up.weight": up, f"{name}.lora_down.weight": down,
                       f"{name}.alpha": torch.tensor(float(rank))})
        else:
            sd.update({f"{name}.lora_B.weight": up, f"{name}.lora_A.weight": down})
    save_file(sd, str(path))


def run(method: str, a: Path, b: Path, work: Path) -> dict:
    out, rep = work / f"flux_{method}.safetensors", work / f"flux_{method}.json"
    argv = ["merge", str(a), str(b), "--method", method, "-o", str(out), "--report", str(rep), "--overwrite"]
    code = (f"import io\nsys.stdout = io.StringIO()\nfrom merge_core.cli import main\n"
            f"code = main({argv!r})\nsys.stdout = sys.__stdout__\nassert code == 0, code")
    began = time.perf_counter()
    peak = child_peak_mb(code, str(ROOT))
    wall = time.perf_counter() - began
    report = json.loads(rep.read_text())
    both = sum(1 for m in report["modules"] if not m.get("note"))
    return {"modules": len(report["modules"]), "both": both, "params": report["total_params"],
            "seconds": report["seconds"], "wall": wall, "peak": peak, "mib": out.stat().st_size / 2**20}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--methods", nargs="+", default=["rsvd", "concat"])
    ap.add_argument("--workdir", help="keep the inputs and outputs here (default: a temp dir, removed at the end)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir) if args.workdir else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        a, b = work / "flux_sd_scripts.safetensors", work / "flux_ai_toolkit.safetensors"
        kohya, diffusers = kohya_modules(), diffusers_modules()
        write(a, kohya, args.rank, True, 1)
        write(b, diffusers, args.rank, False, 2)
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; inputs: sd-scripts-style "
              f"{len(kohya)} modules ({a.stat().st_size / 2**20:.0f} MiB), AI-Toolkit-style {len(diffusers)} modules "
              f"({b.stat().st_size / 2**20:.0f} MiB), rank {args.rank}, fp16\n")
        rows = []
        for method in args.methods:
            r = run(method, a, b, work)
            rows.append([method, r["modules"], r["both"], f"{r['params']:,}", f"{r['mib']:.0f}", f"{r['seconds']:.2f}",
                         f"{r['wall']:.2f}", f"{r['peak']:.0f}"])
        print(md_table(["method", "modules written", "from both inputs", "params", "file (MiB)", "merge (s)",
                        "process wall (s)", "peak RSS (MiB)"], rows))


if __name__ == "__main__":
    main()
