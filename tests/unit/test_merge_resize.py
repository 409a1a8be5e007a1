"""`merge` with one input resizes it: T is the input's own ΔW, re-factored as a LoRA at the ranks the options
choose (a fixed rank, the energy rule, or a file-size budget); LoHa and LoKr inputs come out as LoRAs.
Checked against dense references made here from the raw tensors (SVD of ΔW in fp64)."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from merge_core.cli import main
from merge_core.lora_file import load_lora, save_lora
from merge_testlib import one_torch_thread  # noqa: F401  (autouse)
from merge_testlib import (CONV, F64, NAMES, decaying_lora, dense_of, energy_rank, optimal_error, rel,
                           run_in_process, shape_of)
from synth import FUSE_NAMES, write_loha, write_lokr


def dense_lycoris(path, name: str) -> torch.Tensor:
    """LoKr: (α/r)·kron(w1, w2_a@w2_b), r = w2's rank; LoHa: (α/r)·(w1_a@w1_b)⊙(w2_a@w2_b), r = w1_a's columns."""
    with safe_open(str(path), "pt") as f:
        t = {k[len(name) + 1:]: f.get_tensor(k).to(F64) for k in f.keys() if k.startswith(name + ".")}
    if "lokr_w1" in t:
        return float(t["alpha"]) / t["lokr_w2_a"].shape[1] * torch.kron(t["lokr_w1"], t["lokr_w2_a"] @ t["lokr_w2_b"])
    return (float(t["alpha"]) / t["hada_w1_a"].shape[1] * (t["hada_w1_a"] @ t["hada_w1_b"])
            * (t["hada_w2_a"] @ t["hada_w2_b"]))


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    """Rank 8, α 4, singular values 0.6ⁱ, on four SDXL linear modules and a 3×3 LoCon conv (fp32 file)."""
    modules = {n: decaying_lora(shape_of(n), 8, 0.6, seed=i, alpha=4.0) for i, n in enumerate(NAMES + [CONV])}
    path = tmp_path_factory.mktemp("resize") / "in.safetensors"
    save_lora(modules, path, dtype="fp32")
    return path


def test_one_input_at_a_fixed_rank_is_its_optimal_truncation(lora, tmp_path, capsys):
    out = tmp_path / "r3.safetensors"
    code, stdout, err = run_in_process(capsys, lora, "--method", "svd", "--rank", "3", "--dtype", "fp32", "-o", out)
    assert code == 0, err
    assert "merge: 5 modules" in stdout
    resized = load_lora(out)
    assert {m.rank for m in resized.modules.values()} == {3}
    for name in NAMES + [CONV]:
        T = dense_of(lora, name)
        got = dense_of(out, name)
        assert rel(got, T) == pytest.approx(optimal_error(T, 3), abs=1e-5), name
        s = torch.linalg.svd(T)  # the optimum itself, not just its error: the leading 3 singular triplets
        assert rel(got, s.U[:, :3] @ torch.diag(s.S[:3]) @ s.Vh[:3]) < 1e-5, name
    assert resized.modules[CONV].weight_shape == (320, 320, 3, 3)


def test_one_input_with_the_energy_rule_keeps_the_true_energy_rank(lora, tmp_path, capsys):
    """rsvd (the default) with one input: weight 1 (1/N), the smallest rank keeping 90 % of ‖ΔW‖²."""
    out = tmp_path / "e.safetensors"
    code, _, err = run_in_process(capsys, lora, "--energy", "0.9", "--min-rank", "1", "-o", out)
    assert code == 0, err
    resized = load_lora(out)
    for name in NAMES + [CONV]:
        T = dense_of(lora, name)
        k = energy_rank(T, 0.9, 1, 32)
        assert resized.modules[name].rank == k < 8, name
        assert rel(dense_of(out, name), T) == pytest.approx(optimal_error(T, k), abs=2e-3), name  # fp16 file


@pytest.mark.parametrize("writer", [write_lokr, write_loha], ids=["lokr", "loha"])
def test_a_lycoris_input_becomes_a_lora(writer, tmp_path, capsys):
    src = writer(tmp_path / "in.safetensors", seed=3)
    out = tmp_path / "as_lora.safetensors"
    code, _, err = run_in_process(capsys, src, "--method", "svd", "--rank", "6", "--dtype", "fp32", "-o", out)
    assert code == 0, err
    resized = load_lora(out)
    assert {m.kind for m in resized.modules.values()} == {"lora"}
    for name in FUSE_NAMES:
        T = dense_lycoris(src, name)
        assert rel(dense_of(out, name), T) == pytest.approx(optimal_error(T, 6), abs=1e-5), name


def test_one_input_fits_a_size_budget(lora, tmp_path, capsys):
    """At most 60 % of the rank-8 file's size (fp16 both): the ranks fall, the file fits, and each module is
    the optimal truncation at the rank the budget gave it."""
    full = tmp_path / "full.safetensors"
    assert run_in_process(capsys, lora, "--method", "svd", "--rank", "8", "-o", full)[0] == 0
    budget = int(0.6 * full.stat().st_size)
    out = tmp_path / "sized.safetensors"
    code, _, err = run_in_process(capsys, lora, "--target-size", str(budget), "--min-rank", "1", "-o", out)
    assert code == 0, err
    assert out.stat().st_size <= budget
    ranks = {n: m.rank for n, m in load_lora(out).modules.items()}
    assert set(ranks) == set(NAMES + [CONV]) and all(1 <= r < 8 for r in ranks.values())
    for name, k in ranks.items():
        T = dense_of(lora, name)
        assert rel(dense_of(out, name), T) == pytest.approx(optimal_error(T, k), abs=2e-3), name


def test_inspect_ranks_predicts_what_each_resize_keeps_and_its_file_size(lora, tmp_path, capsys):
    """inspect --ranks: per energy level the true energy ranks (from the dense SVD here), the energy they keep,
    and the size of the file merge then writes (same title: the same file name in another folder), to within
    the few bytes by which the recipes' rank options differ."""
    assert main(["inspect", str(lora), "--ranks", "--json"]) == 0
    rows = {r["choice"]: r for r in json.loads(capsys.readouterr().out)["resize"]}
    assert list(rows) == ["energy 0.5", "energy 0.8", "energy 0.9", "energy 0.95", "energy 0.99", "energy 0.999",
                          "rank 4", "rank 8"]
    dense = {n: dense_of(lora, n) for n in NAMES + [CONV]}
    total = sum(float(T.norm() ** 2) for T in dense.values())
    for choice, row in rows.items():
        if choice.startswith("energy"):
            ranks = [energy_rank(T, float(choice.split()[1]), 1, 8) for T in dense.values()]
        else:
            ranks = [int(choice.split()[1])] * len(dense)
        assert (row["min_rank"], row["max_rank"]) == (min(ranks), max(ranks)), choice
        assert row["avg_rank"] == pytest.approx(sum(ranks) / len(ranks)), choice
        kept = sum(float((torch.linalg.svdvals(T)[:k] ** 2).sum()) for T, k in zip(dense.values(), ranks))
        assert row["energy_kept"] == pytest.approx(kept / total, rel=1e-5), choice
    out = tmp_path / "elsewhere" / lora.name
    out.parent.mkdir()
    for choice, args in (("energy 0.9", ["--energy", "0.9", "--min-rank", "1", "--max-rank", "64"]),
                         ("rank 4", ["--rank", "4"])):
        code, _, err = run_in_process(capsys, lora, "--method", "svd", *args, "-o", out, "--overwrite")
        assert code == 0, err
        assert abs(out.stat().st_size - rows[choice]["file_bytes"]) <= 128, choice  # the recipe's length aside
    assert main(["inspect", str(lora), "--ranks"]) == 0
    text = capsys.readouterr().out
    assert "resize:" in text and "  energy 0.9 " in text and " KiB" in text


def test_the_resize_command_is_merge_with_one_input(lora, tmp_path, capsys):
    """`resize FILE` writes what `merge FILE` does (same tensors), and takes exactly one input."""
    outs = []
    for command in ("resize", "merge"):
        out = tmp_path / f"{command}.safetensors"
        assert main([command, str(lora), "--rank", "3", "--threads", "1", "-o", str(out)]) == 0
        with safe_open(str(out), "pt") as f:
            outs.append({k: f.get_tensor(k) for k in f.keys()})
    assert outs[0].keys() == outs[1].keys() and all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["resize", str(lora), str(lora), "-o", str(tmp_path / "two.safetensors")])
    assert "unrecognized arguments" in capsys.readouterr().err
    assert not (tmp_path / "two.safetensors").exists()
