"""What bake reports and refuses: shape mismatches and unknown modules are skipped (the base tensor is written
unchanged), an existing output is refused before any work; .pt in/out, output dtype, a generic
(LLM-style) model baked back from its own extraction, a PEFT adapter (with DoRA) baked into its model, and the
CLI."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from extract_bake_fixtures import decaying
from merge_core.bake import bake_lora
from merge_core.cli import main
from merge_core.errors import MergeCoreError, OutputExistsError
from merge_core.extract import DictSource, extract_lora
from merge_core.lowrank import RankRule

KEY = "model.diffusion_model.input_blocks.4.1.proj_in.weight"
OTHER = "model.diffusion_model.input_blocks.4.1.proj_out.weight"
NAME = "lora_unet_input_blocks_4_1_proj_in"


@pytest.fixture
def base_file(tmp_path):
    gen = torch.Generator().manual_seed(0)
    base = {KEY: torch.randn(8, 8, generator=gen).half(), OTHER: torch.randn(8, 8, generator=gen).half(),
            "model.diffusion_model.out.0.weight": torch.randn(8, generator=gen).half()}
    save_file(base, str(tmp_path / "base.safetensors"))
    return tmp_path / "base.safetensors", base


def lora_file(path, sd):
    save_file(sd, str(path))
    return path


def test_mismatch_and_unknown_modules_are_reported_and_skipped(tmp_path, base_file):
    path, base = base_file
    lora = lora_file(tmp_path / "l.safetensors", {
        f"{NAME}.lora_up.weight": torch.ones(8, 1), f"{NAME}.lora_down.weight": torch.ones(1, 8),
        "lora_unet_input_blocks_4_1_proj_out.lora_up.weight": torch.ones(6, 1),  # wrong out dim
        "lora_unet_input_blocks_4_1_proj_out.lora_down.weight": torch.ones(1, 8),
        "lora_unet_no_such_layer.lora_up.weight": torch.ones(8, 1),
        "lora_unet_no_such_layer.lora_down.weight": torch.ones(1, 8),
        "lora_unet_out_0.diff_b": torch.ones(8)})  # the norm has no bias in this base
    report = bake_lora(path, lora, tmp_path / "o.safetensors", device="cpu")
    reasons = {(s["module"], s["role"]): s["reason"] for s in report["skipped"]}
    assert reasons[("lora_unet_input_blocks_4_1_proj_out", "weight")].startswith("shape mismatch")
    assert "no matching layer" in reasons[("lora_unet_no_such_layer", "all")]
    assert "no bias" in reasons[("lora_unet_out_0", "bias")]
    assert report["matched"] == [NAME] and report["patched_keys"] == 1
    out = load_file(str(tmp_path / "o.safetensors"))
    assert torch.equal(out[OTHER], base[OTHER])
    torch.testing.assert_close(out[KEY], (base[KEY].float() + 1).half())


def test_refusals(tmp_path, base_file):
    path, _ = base_file
    (tmp_path / "exists.safetensors").write_bytes(b"x")
    with pytest.raises(OutputExistsError):
        bake_lora(path, tmp_path / "missing.safetensors", tmp_path / "exists.safetensors")
    nothing = lora_file(tmp_path / "n.safetensors", {"lora_unet_nope.diff": torch.ones(3)})
    with pytest.raises(MergeCoreError, match="nothing to bake"):
        bake_lora(path, nothing, tmp_path / "o2.safetensors", device="cpu")
    assert not (tmp_path / "o2.safetensors").exists()


def test_pt_base_pt_output_and_output_dtype(tmp_path, base_file):
    _, base = base_file
    torch.save(base, tmp_path / "base.pt")
    lora = lora_file(tmp_path / "l.safetensors", {f"{NAME}.diff": torch.full((8, 8), 0.5)})
    bake_lora(tmp_path / "base.pt", lora, tmp_path / "o.pt", alpha=2.0, output_dtype="fp32", device="cpu")
    out = torch.load(tmp_path / "o.pt", weights_only=True)
    assert list(out) == list(base) and all(t.dtype == torch.float32 for t in out.values())
    torch.testing.assert_close(out[KEY], base[KEY].float() + 1.0)


def test_generic_model_bakes_back_from_its_own_extraction(tmp_path):
    gen = torch.Generator().manual_seed(1)
    shapes = {"model.layers.0.self_attn.o_proj.weight": (40, 40), "model.layers.0.self_attn.o_proj.bias": (40,),
              "model.norm.weight": (40,), "lm_head.weight": (60, 40)}
    base = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
    tuned = {k: v + (decaying(v.shape[0], v.shape[1], gen, 2.0, rank=5) if v.ndim == 2 else 0.1)
             for k, v in base.items()}
    save_file(base, str(tmp_path / "base.safetensors"))
    extract_lora(DictSource(base), DictSource(tuned), RankRule(rank=5), device="cpu").save(
        tmp_path / "l.safetensors", "fp32")
    report = bake_lora(tmp_path / "base.safetensors", tmp_path / "l.safetensors", tmp_path / "o.safetensors",
                       device="cpu")
    assert report["skipped"] == [] and report["patched_keys"] == 4
    out = load_file(str(tmp_path / "o.safetensors"))
    for k in shapes:
        torch.testing.assert_close(out[k], tuned[k], rtol=0, atol=1e-5)


def test_peft_adapter_bakes_into_its_model_as_peft_merges_it(tmp_path):
    """A PEFT folder (r 4, lora_alpha 8) on an LLM-style state dict: plain modules W + s·2·BA; a DoRA module
    (lora_magnitude_vector) m ⊙ W_c / ‖W_c‖ per output row, W_c = W + 2·BA (PEFT's merge), then W + s·(that − W)."""
    gen = torch.Generator().manual_seed(4)
    q, o = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.o_proj.weight"
    base = {q: torch.randn(24, 16, generator=gen), o: torch.randn(16, 24, generator=gen),
            "model.norm.weight": torch.randn(16, generator=gen)}
    save_file(base, str(tmp_path / "base.safetensors"))
    (tmp_path / "adapter").mkdir()
    sd, deltas = {}, {}
    for key in (q, o):
        name = "base_model.model." + key[:-len(".weight")]
        B, A = torch.randn(base[key].shape[0], 4, generator=gen), torch.randn(4, base[key].shape[1], generator=gen)
        sd |= {f"{name}.lora_B.weight": B, f"{name}.lora_A.weight": A}
        deltas[key] = 2.0 * B @ A
    m = torch.rand(24, generator=gen) + 0.5
    sd["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"] = m
    save_file(sd, str(tmp_path / "adapter" / "adapter_model.safetensors"))
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_dora": True, "target_modules": ["q_proj", "o_proj"]}))
    s = 0.8
    report = bake_lora(tmp_path / "base.safetensors", tmp_path / "adapter", tmp_path / "o.safetensors", alpha=s,
                       device="cpu")
    assert report["skipped"] == [] and report["patched_keys"] == 2 and report["dora_modules"] == 1
    out = load_file(str(tmp_path / "o.safetensors"))
    torch.testing.assert_close(out[o], base[o] + s * deltas[o], rtol=1e-5, atol=1e-5)
    Wc = base[q] + deltas[q]
    merged = (m / torch.stack([row.norm() for row in Wc]))[:, None] * Wc
    torch.testing.assert_close(out[q], base[q] + s * (merged - base[q]), rtol=1e-5, atol=1e-5)
    assert torch.equal(out["model.norm.weight"], base["model.norm.weight"])


def test_cli_bake(tmp_path, base_file, capsys):
    path, base = base_file
    lora = lora_file(tmp_path / "l.safetensors", {f"{NAME}.lora_up.weight": torch.ones(8, 1),
                                                  f"{NAME}.lora_down.weight": torch.ones(1, 8),
                                                  f"{NAME}.alpha": torch.tensor(1.0)})
    rc = main(["bake", "--source-model", str(path), "--lora-model", str(lora), "--alpha", "0.5", "-o",
               str(tmp_path / "merged"), "--output-dtype", "bf16", "--report", str(tmp_path / "r.json"),
               "--device", "cpu"])
    assert rc == 0 and "baked 1 modules" in capsys.readouterr().out
    out = load_file(str(tmp_path / "merged.safetensors"))
    assert out[KEY].dtype == torch.bfloat16
    torch.testing.assert_close(out[KEY].float(), base[KEY].float() + 0.5, rtol=1e-2, atol=1e-2)
    assert json.loads((tmp_path / "r.json").read_text())["matched"] == [NAME]
    assert main(["bake", "--source-model", str(path), "--lora-model", str(lora), "--lora-type", "pytorch",
                 "-o", str(tmp_path / "x.safetensors")]) == 2
    assert "--lora-type pytorch" in capsys.readouterr().err


def test_a_strength_that_overflows_the_checkpoint_dtype_is_refused(tmp_path, base_file):
    path, _ = base_file  # fp16
    lora = lora_file(tmp_path / "l.safetensors", {f"{NAME}.lora_up.weight": torch.ones(8, 1),
                                                  f"{NAME}.lora_down.weight": torch.ones(1, 8)})
    with pytest.raises(MergeCoreError, match=f"^base tensor '{KEY}' patched at strength 1e\\+06 holds values up to "
                                             ".*, beyond float16's range .*; nothing was written$"):
        bake_lora(path, lora, tmp_path / "o.safetensors", alpha=1e6, device="cpu")
    assert not (tmp_path / "o.safetensors").exists()


def test_an_unpatched_tensor_beyond_the_output_dtype_is_refused_too(tmp_path):
    """An fp32 checkpoint baked to fp16: every tensor is cast, not only the patched ones."""
    base = {KEY: torch.zeros(8, 8), OTHER: torch.full((8, 8), 1e5)}
    save_file(base, str(tmp_path / "base.safetensors"))
    lora = lora_file(tmp_path / "l.safetensors", {f"{NAME}.lora_up.weight": torch.ones(8, 1),
                                                  f"{NAME}.lora_down.weight": torch.ones(1, 8)})
    with pytest.raises(MergeCoreError, match=f"^base tensor '{OTHER}' holds values up to 100000, beyond float16's"):
        bake_lora(tmp_path / "base.safetensors", lora, tmp_path / "o.safetensors", output_dtype="fp16", device="cpu")
    assert not (tmp_path / "o.safetensors").exists()
    bake_lora(tmp_path / "base.safetensors", lora, tmp_path / "o.safetensors", output_dtype="bf16", device="cpu")
