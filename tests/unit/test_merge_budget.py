"""--target-size: the greedy allocation against an exact knapsack optimum computed here, the file it writes
(never above the target, ranks within bounds, more energy kept than one rank for all), and its refusals."""
from __future__ import annotations

import json
import random

import pytest

from merge_core.errors import MergeCoreError
from merge_core.lora_file import load_lora
from merge_core.commands.common import parse_size
from merge_core.lowrank.size_budget import Spectrum, allocate, kept
from merge_testlib import one_torch_thread  # noqa: F401  (autouse)
from merge_testlib import cli_inputs, run_in_process


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return cli_inputs(tmp_path_factory.mktemp("merge_budget"))


def optimum(spectra, budget):
    """The best Σ kept σ² by dynamic programming over (module, bytes): a multiple-choice knapsack."""
    best = {0: 0.0}
    for s in spectra:
        nxt = {}
        for spent, value in best.items():
            for k in range(s.low, s.high + 1):
                cost = spent + k * s.cost
                if cost <= budget:
                    v = value + sum(s.sq[:k])
                    if v > nxt.get(cost, -1.0):
                        nxt[cost] = v
        best = nxt
    return max(best.values())


def random_spectra(rng, n, equal_costs):
    out = []
    for i in range(n):
        high = rng.randint(2, 6)
        sq = tuple(sorted((rng.random() ** 2 for _ in range(high)), reverse=True))
        out.append(Spectrum(f"m{i}", sq, sum(sq) * 1.1, 5 if equal_costs else rng.randint(2, 9), 1, high))
    return out


@pytest.mark.parametrize("seed", range(12))
def test_greedy_is_within_one_step_of_the_optimum_and_exact_for_equal_costs(seed):
    rng = random.Random(seed)
    for equal in (True, False):
        spectra = random_spectra(rng, 5, equal)
        budget = sum(s.low * s.cost for s in spectra) + rng.randint(0, 40)
        ranks = allocate(spectra, budget)
        assert sum(ranks[s.name] * s.cost for s in spectra) <= budget
        assert all(s.low <= ranks[s.name] <= s.high for s in spectra)
        got, best = kept(spectra, ranks) * sum(s.total for s in spectra), optimum(spectra, budget)
        if equal:
            assert got == pytest.approx(best, rel=1e-12)
        else:
            assert got >= best - max(s.sq[0] for s in spectra) - 1e-12
        # nothing that still fits is left out
        assert all(ranks[s.name] == s.high or sum(ranks[t.name] * t.cost for t in spectra) + s.cost > budget
                   for s in spectra)


def test_a_budget_below_the_minimum_ranks_is_refused():
    spectra = [Spectrum("a", (1.0, 0.5), 1.5, 100, 2, 2)]
    with pytest.raises(MergeCoreError, match="budget is too small: every module at its minimum rank"):
        allocate(spectra, 150)


@pytest.mark.parametrize("text,expected", [("100MB", 10**8), ("64MiB", 64 * 2**20), ("1.5 GB", 1_500_000_000),
                                           ("123456", 123456), ("2kib", 2048)])
def test_sizes(text, expected):
    assert parse_size(text) == expected


def test_a_malformed_size_is_one_line():
    with pytest.raises(MergeCoreError, match="a size is a number with an optional unit"):
        parse_size("lots")


@pytest.mark.parametrize("method", ["rsvd", "svd", "ties", "dare_ties"])
def test_the_file_fits_the_target_and_keeps_more_than_one_rank_for_all(inputs, tmp_path, capsys, method):
    full = tmp_path / "full.safetensors"
    bounds = ["--method", method, "--max-rank", "12", "--min-rank", "1"]
    assert run_in_process(capsys, *inputs, "-o", full, *bounds, "--energy", "1.0")[0] == 0
    target = int(full.stat().st_size * 0.6)
    out, report = tmp_path / "fit.safetensors", tmp_path / "report.json"
    code, stdout, _ = run_in_process(capsys, *inputs, "-o", out, *bounds, "--target-size", str(target),
                                     "--report", report)
    assert code == 0
    assert out.stat().st_size <= target
    budget = json.loads(report.read_text())["size_budget"]
    assert budget["energy_kept"] >= budget["uniform_energy_kept"]
    ranks = {n: m.rank for n, m in load_lora(out).modules.items()}
    assert 1 <= min(ranks.values()) and max(ranks.values()) <= 12 and len(set(ranks.values())) > 1
    assert "size budget" in stdout and f"{out.name} is" in stdout
    recipe = json.loads(load_lora(out).metadata["lora_rsvd_merge.recipe"])
    assert recipe["parameters"]["target_size"] == target


@pytest.mark.parametrize("args,message", [
    (("--rank", "4"), "cannot be combined with a fixed --rank"),
    (("--method", "concat"), "--target-size chooses ranks; concat's rank follows from its inputs"),
])
def test_refusals(inputs, tmp_path, capsys, args, message):
    out = tmp_path / "x.safetensors"
    code, _, err = run_in_process(capsys, *inputs, *args, "--target-size", "1MB", "-o", out)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_a_target_below_the_header_is_refused(inputs, tmp_path, capsys):
    code, _, err = run_in_process(capsys, *inputs, "--target-size", "100", "-o", tmp_path / "x.safetensors")
    assert code == 2 and "the header and the tensors that do not depend on rank already take" in err


def test_only_safetensors_outputs_are_sized(inputs, tmp_path, capsys):
    code, _, err = run_in_process(capsys, *inputs, "--target-size", "1MB", "-o", tmp_path / "x.pt")
    assert code == 2 and "sizes a .safetensors file or a PEFT folder, not x.pt" in err
