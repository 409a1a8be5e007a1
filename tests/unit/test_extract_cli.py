"""`python -m merge_core extract`: the original extractor's flags and defaults (rank 32, bf16, safetensors),
the energy rule when --energy is given, reports, formats, refusals."""
from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from extract_bake_fixtures import decaying
from merge_core.cli import main
from merge_core.files.metadata import RECIPE_KEY

KEYS = {"model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight": (96, 96),
        "model.diffusion_model.input_blocks.1.0.in_layers.2.weight": (48, 48, 3, 3),
        "model.diffusion_model.input_blocks.4.1.norm.bias": (96,),
        "conditioner.embedders.0.transformer.text_model.encoder.layers.0.mlp.fc2.weight": (64, 128)}
Q = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
CONV = "lora_unet_input_blocks_1_0_in_layers_2"
TE = "lora_te1_text_model_encoder_layers_0_mlp_fc2"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    gen = torch.Generator().manual_seed(0)
    base, tuned = {}, {}
    for key, shape in KEYS.items():
        w = torch.randn(shape, generator=gen).half()
        delta = decaying(shape[0], w[0].numel(), gen, 4.0, scale=0.5).reshape(shape) if len(shape) > 1 else \
            0.1 * torch.randn(shape, generator=gen)
        base[key], tuned[key] = w, (w.float() + delta).half()
    save_file(base, str(d / "base.safetensors"))
    save_file(tuned, str(d / "tuned.safetensors"))
    return d


def run(models, out, *extra):
    return main(["extract", "--source-model", str(models / "base.safetensors"), "--target-model",
                 str(models / "tuned.safetensors"), "-o", str(out), "--device", "cpu", *extra])


def test_defaults_are_the_originals_rank_32_bf16(models, tmp_path, capsys):
    assert run(models, tmp_path / "lora.safetensors", "--report", str(tmp_path / "r.json")) == 0
    sd = load_file(str(tmp_path / "lora.safetensors"))
    assert sd[f"{Q}.lora_down.weight"].shape == (32, 96) and sd[f"{Q}.lora_up.weight"].dtype == torch.bfloat16
    assert float(sd[f"{Q}.alpha"]) == 32.0
    assert sd[f"{CONV}.lora_down.weight"].shape == (32, 48, 3, 3)
    assert f"{TE}.lora_up.weight" in sd and "lora_unet_input_blocks_4_1_norm.diff_b" in sd
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["operation"] == "extract" and report["parameters"]["rank"] == 32
    with safe_open(str(tmp_path / "lora.safetensors"), "pt") as f:
        recipe = json.loads(f.metadata()[RECIPE_KEY])
    assert [(i["name"], i["sha256"]) for i in recipe["inputs"]] == [  # both checkpoints, hashed beside the work
        (n, hashlib.sha256((models / n).read_bytes()).hexdigest()) for n in ("base.safetensors", "tuned.safetensors")]
    assert "wrote" in capsys.readouterr().out


def test_energy_gives_the_dynamic_rule(models, tmp_path):
    assert run(models, tmp_path / "dyn.safetensors", "--energy", "0.9", "--min-rank", "2", "--max-rank", "12",
               "--conv-rank", "3") == 0
    sd = load_file(str(tmp_path / "dyn.safetensors"))
    ranks = {k.split(".")[0]: v.shape[0] for k, v in sd.items() if k.endswith("lora_down.weight")}
    assert 2 <= ranks[Q] <= 12 and ranks[Q] < 32 and ranks[CONV] <= 3


def test_rank_bounds_alone_turn_the_energy_rule_on_and_bounds_out_of_order_are_refused(models, tmp_path, capsys):
    report = tmp_path / "r.json"
    assert run(models, tmp_path / "b.safetensors", "--max-rank", "6", "--report", str(report)) == 0
    sd = load_file(str(tmp_path / "b.safetensors"))
    assert max(v.shape[0] for k, v in sd.items() if k.endswith("lora_down.weight")) <= 6
    assert json.loads(report.read_text())["parameters"]["energy"] == 0.99
    assert run(models, tmp_path / "two.safetensors", "--max-rank", "2") == 0  # min-rank's default 4 moves down
    sd = load_file(str(tmp_path / "two.safetensors"))
    assert {v.shape[0] for k, v in sd.items() if k.endswith("lora_down.weight")} == {2}
    capsys.readouterr()
    assert run(models, tmp_path / "c.safetensors", "--min-rank", "40", "--max-rank", "8") == 2
    assert capsys.readouterr().err.strip().splitlines() == ["error: need 1 <= min_rank <= max_rank, got 40..8"]
    assert not (tmp_path / "c.safetensors").exists()


def test_options_that_do_not_apply_are_named_in_a_warning(models, tmp_path, caplog):
    assert run(models, tmp_path / "d.safetensors", "--diff-only", "--min-rank", "50") == 0
    assert run(models, tmp_path / "t.safetensors", "--target-size", "40KB", "--energy", "0.5") == 0
    assert run(models, tmp_path / "r.safetensors", "--rank", "4", "--max-rank", "8") == 0
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warned == ["rank options do not apply to --diff-only (changed tensors are stored whole); ignored",
                      "--energy does not apply with --target-size (the budget chooses the ranks); ignored",
                      "both --rank and --min-rank/--max-rank given: using the fixed rank 4"]


def test_diff_only_no_text_encoders_fp32(models, tmp_path):
    assert run(models, tmp_path / "d.safetensors", "--diff-only", "--no-text-encoders", "--output-dtype",
               "fp32") == 0
    sd = load_file(str(tmp_path / "d.safetensors"))
    assert all(k.endswith((".diff", ".diff_b")) for k in sd) and not any(k.startswith("lora_te") for k in sd)
    base, tuned = load_file(str(models / "base.safetensors")), load_file(str(models / "tuned.safetensors"))
    key = next(iter(KEYS))
    torch.testing.assert_close(sd[f"{Q}.diff"], tuned[key].float() - base[key].float())


def test_output_format_pytorch_appends_suffix(models, tmp_path):
    assert run(models, tmp_path / "out", "--output-format", "pytorch", "--rank", "4") == 0
    sd = torch.load(tmp_path / "out.pt", weights_only=True)
    assert sd[f"{Q}.lora_down.weight"].shape == (4, 96)


def test_refusals_are_one_line_errors(models, tmp_path, capsys):
    out = tmp_path / "x.safetensors"
    assert run(models, out, "--rank", "4") == 0
    capsys.readouterr()
    assert run(models, out, "--rank", "4") == 2
    assert "output exists" in capsys.readouterr().err
    assert run(models, tmp_path / "y.safetensors", "--source-type", "pytorch") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--source-model pytorch" in err and len(err.strip().splitlines()) == 1


def test_nan_in_a_model_is_one_line_and_writes_nothing(models, tmp_path, capsys):
    tuned = load_file(str(models / "tuned.safetensors"))
    key = next(iter(KEYS))
    tuned[key][0, 0] = float("inf")
    save_file(tuned, str(tmp_path / "tuned_inf.safetensors"))
    out = tmp_path / "x.safetensors"
    code = main(["extract", "--source-model", str(models / "base.safetensors"), "--target-model",
                 str(tmp_path / "tuned_inf.safetensors"), "-o", str(out), "--device", "cpu"])
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: tensor '{key}': the difference of the two models holds NaN or infinite values (a damaged "
        "checkpoint?); nothing was written"]
    assert not out.exists()


def test_target_size_fits_the_file_and_keeps_more_than_one_rank_for_all(models, tmp_path, capsys):
    bounds = ["--min-rank", "1", "--max-rank", "24", "--output-dtype", "fp16"]
    full = tmp_path / "full.safetensors"
    assert run(models, full, "--energy", "1.0", *bounds) == 0
    target = int(full.stat().st_size * 0.5)
    out, report = tmp_path / "fit.safetensors", tmp_path / "fit.json"
    capsys.readouterr()
    assert run(models, out, "--target-size", str(target), "--report", str(report), *bounds) == 0
    assert out.stat().st_size <= target
    assert "size budget" in capsys.readouterr().out
    budget = json.loads(report.read_text())["size_budget"]
    assert budget["energy_kept"] >= budget["uniform_energy_kept"] and budget["energy_of"] == "ΔW = tuned − base"
    lora = load_file(str(out))
    ranks = {k: v.shape[0] for k, v in lora.items() if k.endswith(".lora_down.weight")}
    assert len(ranks) == 3 and max(ranks.values()) <= 24 and len(set(ranks.values())) > 1


def test_target_size_refusals(models, tmp_path, capsys):
    assert run(models, tmp_path / "x.safetensors", "--target-size", "1MB", "--rank", "8") == 2
    assert "cannot be combined with a fixed --rank" in capsys.readouterr().err
    assert run(models, tmp_path / "y.safetensors", "--target-size", "100") == 2
    assert "the header and the tensors that do not depend on rank already take" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "y.safetensors").exists()
