"""Merge benchmark on two full-size SDXL kohya LoRAs (986 modules, rank 32, decaying spectra), made here.

Prints the seed report's table (method, total params, average rank, merge time) for every method, each run
as `python -m merge_core merge` in its own process (so its peak RSS is its own), plus:
  - end-to-end rsvd merge time (CLI in this process: load, merge, recipe hashes, write) divided by the time
    to only load both inputs (every tensor read: the reader memory-maps) and write one output of the same
    modules in this process (target ≤ 2.0), in wall and in CPU seconds: once with the inputs hashed on every
    run (a first merge of these files), once with their hashes remembered (a later merge of the same files;
    merge_core.files.digests, its cache in the work folder);
  - the dense kohya-style SVD (torch.linalg.svd of each dense ΔW) timed on a sample of modules per shape and
    extrapolated to the whole file;
  - peak memory per method against inputs + output + a small multiple of the largest module's dense fp32 ΔW
    (the CLI writes a .safetensors output module by module, so none of the output is held: budget inputs +
    that multiple);
  - rsvd with a size budget (--target-size) for each --budgets size: the file, ranks and energy kept, against
    one rank for all modules in the same size.

    python bench/merge_bench.py [--quick] [--threads N] [--workdir DIR] [--methods m1 m2 ...] [--budgets 100MB]
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._common import child_peak_mb, decaying_factors, md_table, sync  # noqa: E402
from merge_core.cli import main as cli_main  # noqa: E402
from merge_core.device import resolve_device  # noqa: E402
from merge_core.files.digests import ENV as CACHE_ENV  # noqa: E402
from merge_core.keys.sdxl_table import sdxl_modules  # noqa: E402
from merge_core.lora_file import load_lora, save_lora  # noqa: E402
from merge_core.lowrank import Factored, RankRule, low_rank  # noqa: E402
from merge_core.merge import METHODS  # noqa: E402

RANK, ALPHA = 32, 16.0
MIB = 1024 * 1024
MODULE_MULTIPLE = 4  # "a small multiple of the largest module": its dense fp32 ΔW, 4 times


def specs(quick: bool):
    all_specs = [s for s in sdxl_modules().values() if not s.locon]
    return all_specs[::40] if quick else all_specs


def make_input(path: Path, seed: int, quick: bool) -> None:
    """A kohya SDXL LoRA, fp16, α = 16, rank 32; each ΔW's singular values decay geometrically (0.75..0.9)."""
    sd = {}
    for i, s in enumerate(specs(quick)):
        out, inn = s.matrix_shape
        U, V = decaying_factors(out, inn, RANK, decay=0.75 + 0.15 * ((i * 7 + seed) % 11) / 10, seed=seed * 10007 + i)
        root = (RANK / ALPHA) ** 0.5  # α/r = 0.5 applied on load: pre-scale so ΔW keeps the designed spectrum
        sd[f"{s.name}.lora_up.weight"] = (U * root).half().contiguous()
        sd[f"{s.name}.lora_down.weight"] = (V * root).half().contiguous()
        sd[f"{s.name}.alpha"] = torch.tensor(ALPHA)
    from safetensors.torch import save_file

    save_file(sd, str(path))


def run_method(method: str, a: Path, b: Path, work: Path, threads: int, device: str, extra: tuple[str, ...] = (),
               tag: str = "") -> dict:
    """One CLI merge in its own process (stdout discarded): its report (params, rank, seconds) and peak RSS."""
    out, rep = work / f"out_{method}{tag}.safetensors", work / f"report_{method}{tag}.json"
    argv = ["merge", str(a), str(b), "--method", method, "-o", str(out), "--report", str(rep), "--overwrite",
            "--device", device, "--threads", str(threads), *extra]
    code = (f"import io\nsys.stdout = io.StringIO()\nfrom merge_core.cli import main\n"
            f"code = main({argv!r})\nsys.stdout = sys.__stdout__\nassert code == 0, code")
    peak = child_peak_mb(code, str(ROOT))
    report = json.loads(rep.read_text())
    return {"report": report, "peak_mb": peak, "out_bytes": out.stat().st_size}


def baseline_rss_mb(device: torch.device) -> float:
    """Peak RSS of a process that only imports torch and merge_core (subtracted from every peak) and, for a
    GPU, starts CUDA and its BLAS and solver libraries (host memory every CUDA merge pays before any module)."""
    start = ("\nx = torch.randn(64, 64, device='cuda')\ntorch.linalg.qr(x @ x)\ntorch.linalg.eigh(x @ x.T)"
             if device.type == "cuda" else "")
    return child_peak_mb(f"import torch, merge_core.merge, merge_core.cli{start}", str(ROOT))


def materialised(path: Path) -> dict:
    """load_lora, then every tensor read into memory (the reader memory-maps; a merge reads every byte)."""
    modules = load_lora(path).modules
    for m in modules.values():
        m.up, m.down = m.up.clone(), m.down.clone()
    return modules


def io_only(a: Path, b: Path, out: Path, modules: dict) -> None:
    """Load both inputs and write one output holding `modules` (the merged file's, read beforehand)."""
    materialised(a), materialised(b)
    save_lora(modules, out, overwrite=True)


def end_to_end(a: Path, b: Path, out: Path, device: str) -> None:
    with contextlib.redirect_stdout(io.StringIO()):
        rc = cli_main(["merge", str(a), str(b), "--method", "rsvd", "-o", str(out), "--overwrite", "--device", device,
                       "--threads", str(torch.get_num_threads())])
    if rc:
        raise RuntimeError(f"merge exited {rc}")


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process, all threads) of fn()."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


@contextlib.contextmanager
def hash_cache(setting: str):
    """$MERGE_CORE_CACHE = setting (a folder, or "off") for the block."""
    before = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = setting
    try:
        yield
    finally:
        if before is None:
            del os.environ[CACHE_ENV]
        else:
            os.environ[CACHE_ENV] = before


def ratio(a: Path, b: Path, work: Path, repeats: int, device: str) -> dict:
    """Medians and minima of end-to-end rsvd and of load+write (wall and CPU seconds), the two alternating."""
    merged = work / "e2e_rsvd.safetensors"
    end_to_end(a, b, merged, device)  # warm-up: page cache, lazy imports, CUDA context (and the hash cache)
    modules = materialised(merged)  # what the load+write baseline writes: the same modules, same dtype
    e2e, io_t = [], []
    for _ in range(repeats):  # each timed run starts with no earlier write still being flushed
        os.sync()
        e2e.append(timed(lambda: end_to_end(a, b, merged, device)))
        os.sync()
        io_t.append(timed(lambda: io_only(a, b, work / "io_only.safetensors", modules)))
    out = {k: statistics.median(x[i] for x in runs) for k, runs, i in
           (("e2e", e2e, 0), ("e2e_cpu", e2e, 1), ("io", io_t, 0), ("io_cpu", io_t, 1))}
    out.update(e2e_min=min(x[0] for x in e2e), io_min=min(x[0] for x in io_t),
               pairs=[x[0] / y[0] for x, y in zip(e2e, io_t)])  # each run over the load + write right after it
    return {**out, "ratio": out["e2e"] / out["io"], "cpu_ratio": out["e2e_cpu"] / out["io_cpu"],
            "min_ratio": out["e2e_min"] / out["io_min"]}


def ratio_lines(label: str, sp: dict, repeats: int) -> str:
    """The ratio's two lines: medians, best, CPU seconds; then run by run."""
    pairs = sp["pairs"]
    return (f"rsvd end-to-end, {label}: {sp['e2e']:.2f} s / load both + write one output {sp['io']:.2f} s = "
            f"{sp['ratio']:.2f} (medians of {repeats}; target <= 2.0: {'met' if sp['ratio'] <= 2.0 else 'NOT met'}); "
            f"best of {repeats}: {sp['e2e_min']:.2f} / {sp['io_min']:.2f} = {sp['min_ratio']:.2f}; in CPU seconds "
            f"of this process: {sp['e2e_cpu']:.2f} / {sp['io_cpu']:.2f} = {sp['cpu_ratio']:.2f}; load average "
            f"{os.getloadavg()[0]:.1f} on {cores()} cores\n"
            f"  run by run (each over the load + write that followed it): {' '.join(f'{x:.2f}' for x in pairs)}; "
            f"{sum(x <= 2.0 for x in pairs)} of {len(pairs)} at or under 2.0")


def solver_estimate(a: Path, b: Path, solver: str, device: torch.device, per_shape: int = 1) -> tuple[float, int, Counter]:
    """Seconds for merge_core.lowrank.low_rank(…, solver) at rank 32 on T = ½ΔW₁ + ½ΔW₂ of every module, on
    `device`, extrapolated from `per_shape` timed modules of each distinct shape ("dense": the kohya-style
    torch.linalg.svd of the dense ΔW; "rsvd": the seeded sketch, k+p = 40 columns, 2 power iterations).
    One untimed solve first, so library start-up (CUDA context, solver handles) stays out of the numbers."""
    sa, sb = load_lora(a), load_lora(b)
    counts = Counter(m.matrix_shape for m in sa.modules.values())

    def merged(name: str) -> Factored:
        pa, pb = sa.modules[name].operator(), sb.modules[name].operator()
        return Factored(torch.cat([pa.U * 0.5, pb.U * 0.5], 1).to(device), torch.cat([pa.V, pb.V], 0).to(device))

    low_rank(merged(next(iter(sa.modules))), RankRule(rank=RANK), solver=solver)
    seconds, n_timed = 0.0, 0
    for shape, n in counts.items():
        names = [k for k, m in sa.modules.items() if m.matrix_shape == shape][:per_shape]
        per = []
        for name in names:
            op = merged(name)
            sync()
            start = time.perf_counter()
            low_rank(op, RankRule(rank=RANK), solver=solver)
            sync()
            per.append(time.perf_counter() - start)
            n_timed += 1
        seconds += statistics.median(per) * n
    return seconds, n_timed, counts


def cores() -> str:
    """The CPU cores this process may run on (taskset / cgroup pinning), and the machine's count if more."""
    usable, total = len(os.sched_getaffinity(0)), os.cpu_count()
    return f"{usable}" if usable == total else f"{usable} (of {total}, pinned)"


def device_label(device: torch.device) -> str:
    return f"{device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else str(device)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="25 modules instead of 986 (smoke run)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own default)")
    ap.add_argument("--workdir", help="keep inputs/outputs here (default: a temp dir, removed at the end)")
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats for the ratio (median, and best of)")
    ap.add_argument("--budgets", nargs="*", default=["100MB", "64MiB"], help="rsvd --target-size runs")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"],
                    help="where every merge and solver timing runs (default cpu: the issue's 2-core target)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    device = resolve_device(args.device)
    with contextlib.ExitStack() as stack:
        work = Path(args.workdir) if args.workdir else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        work.mkdir(parents=True, exist_ok=True)
        a, b = work / "a.safetensors", work / "b.safetensors"
        start = time.perf_counter()
        for path, seed in ((a, 1), (b, 2)):
            if not path.exists():
                make_input(path, seed, args.quick)
        n_modules = len(load_lora(a).modules)
        print(f"torch {torch.__version__}, {cores()} CPU cores, {threads} threads, device {device_label(device)}; inputs: 2 x {n_modules} "
              f"modules, rank {RANK}, alpha {ALPHA:g}, fp16, {a.stat().st_size / MIB:.0f} MiB each "
              f"(made in {time.perf_counter() - start:.0f} s)")

        # the hashes of the inputs are remembered in the work folder, not in the user's cache (the method runs'
        # processes inherit this)
        os.environ.setdefault(CACHE_ENV, str(work / "hash_cache"))
        # as `python -m merge_core` does after its imports: the objects alive now are not walked by every full
        # collection during the timed runs (~0.09 s each, in about one run of two)
        gc.freeze()
        # the ratio first, on a quiet machine: the method runs below leave GBs of dirty pages behind, whose
        # writeback would land in the middle of the timed runs
        with hash_cache("off"):
            cold = ratio(a, b, work, args.repeats, str(device))
        warm = ratio(a, b, work, args.repeats, str(device))
        base = baseline_rss_mb(device)
        rows, mem_rows = [], []
        largest = max(s.shape[0] * s.shape[1] for s in specs(args.quick)) * 4 / MIB
        inputs_mb = (a.stat().st_size + b.stat().st_size) / MIB
        for method in args.methods:
            r = run_method(method, a, b, work, threads, str(device))
            rep, out_mb = r["report"], r["out_bytes"] / MIB
            errs = [m["rel_error"] for m in rep["modules"]]
            rows.append([method, f"{rep['total_params']:,}", f"{rep['avg_rank']:.2f}", f"{rep['seconds']:.2f}",
                         f"{rep['total_seconds']:.2f}", f"{statistics.mean(errs):.3e}", f"{max(errs):.3e}"])
            extra = r["peak_mb"] - base - inputs_mb  # the output is written as it is made, not held
            mem_rows.append([method, f"{r['peak_mb']:.0f}", f"{r['peak_mb'] - base:.0f}", f"{inputs_mb:.0f}",
                             f"{out_mb:.0f}", f"{extra:.0f}", f"{extra / largest:.1f}",
                             "yes" if extra <= MODULE_MULTIPLE * largest else "NO"])
            print(f"  {method}: done ({rep['total_seconds']:.1f} s)", file=sys.stderr)
        print("\nPer method (CLI, one process each; merge time = the merge run, which writes each module as it is done; end-to-end = load+merge+write):")
        print(md_table(["method", "total params", "average rank", "merge time (s)", "end-to-end (s)",
                        "mean rel error", "max rel error"], rows))

        print()
        for label, sp in (("inputs hashed on every run (a first merge of these files)", cold),
                          ("input hashes remembered (a later merge of the same files)", warm)):
            print(ratio_lines(label, sp, args.repeats))

        for solver, what in (("dense", "dense kohya-style SVD (torch.linalg.svd of each dense ΔW)"),
                             ("rsvd", "randomized sketch on the factors (k+p = 40, q = 2)")):
            sec, n_timed, counts = solver_estimate(a, b, solver, device, per_shape=1 if solver == "dense" else 3)
            print(f"{what}, rank {RANK}: {n_timed} modules timed ({len(counts)} shapes), extrapolated to "
                  f"{sum(counts.values())} modules: {sec:.1f} s")

        budget_rows = []
        for size in args.budgets:
            r = run_method("rsvd", a, b, work, threads, str(device), ("--target-size", size), f"_{size}")
            sb, rep = r["report"]["size_budget"], r["report"]
            budget_rows.append([size, f"{r['out_bytes']:,}", f"{sb['target_bytes']:,}",
                                f"{sb['min_rank']}-{sb['max_rank']} ({sb['avg_rank']:.1f})",
                                f"{100 * sb['energy_kept']:.2f} %",
                                f"rank {sb['uniform_rank']}: {100 * sb['uniform_energy_kept']:.2f} %"
                                if sb["uniform_rank"] is not None else "-",
                                f"{rep['total_seconds']:.2f}"])
        if budget_rows:
            print("\nrsvd with a size budget (--target-size; CLI, one process each; end-to-end seconds):")
            print(md_table(["target", "file bytes", "target bytes", "ranks (avg)", "energy kept",
                            "one rank for all, same size", "end-to-end (s)"], budget_rows))

        print(f"\nPeak memory (VmHWM of each CLI process, MiB; baseline = importing torch + merge_core{' + starting CUDA' if device.type == 'cuda' else ''}: {base:.0f} "
              f"MiB; extra = peak - baseline - inputs (the output file is written module by module, none of it held); the largest module "
              f"as dense fp32 is {largest:.0f} MiB; budget: extra <= {MODULE_MULTIPLE} x that):")
        print(md_table(["method", "peak RSS", "peak - baseline", "inputs", "output file", "extra",
                        "extra / largest module", "within"], mem_rows))


if __name__ == "__main__":
    main()
