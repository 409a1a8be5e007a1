"""The original scripts' API: merge_lora_models and merge_lora_adapters_covention with custom suffixes, on
kohya SDXL files and on PEFT folders of an LLM adapter (lora_A/lora_B, alpha in adapter_config.json)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from merge_core.errors import MergeCoreError, OutputExistsError
from merge_core.lora_file import load_lora
from merge_core.merge.legacy_api import merge_lora_adapters_covention, merge_lora_models
from merge_testlib import one_torch_thread  # noqa: F401  (autouse)
from merge_testlib import F64, NAMES, dense, gen, optimal_error, rel, shape_of

LLM = {"base_model.model.model.layers.0.self_attn.q_proj": (64, 48),
       "base_model.model.model.layers.0.mlp.down_proj": (48, 96)}


def kohya_file(path: Path, seed: int, rank: int = 8, alpha: float = 4.0) -> dict:
    sd, deltas = {}, {}
    for i, n in enumerate(NAMES[:2]):
        out, inn = shape_of(n)
        up = torch.randn(out, rank, generator=gen(seed + i)) * 0.1
        down = torch.randn(rank, inn, generator=gen(seed + 9 + i))
        sd.update({f"{n}.lora_up.weight": up, f"{n}.lora_down.weight": down, f"{n}.alpha": torch.tensor(alpha)})
        deltas[n] = alpha / rank * (up.to(F64) @ down.to(F64))
    save_file(sd, str(path))
    return deltas


def peft_folder(path: Path, seed: int, r: int = 8, alpha: float = 16.0) -> dict:
    path.mkdir()
    sd, deltas = {}, {}
    for i, (n, (out, inn)) in enumerate(LLM.items()):
        B, A = torch.randn(out, r, generator=gen(seed + i)), torch.randn(r, inn, generator=gen(seed + 5 + i))
        sd.update({f"{n}.lora_B.weight": B, f"{n}.lora_A.weight": A})
        deltas[n] = alpha / r * (B.to(F64) @ A.to(F64))
    save_file(sd, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": r, "lora_alpha": alpha,
                                                          "target_modules": ["q_proj", "down_proj"]}))
    return deltas


def dense_file(path: Path, name: str, up_suffix: str, down_suffix: str, alpha_suffix: str) -> torch.Tensor:
    with safe_open(str(path), "pt") as f:
        up, down = f.get_tensor(name + up_suffix).to(F64), f.get_tensor(name + down_suffix).to(F64)
        a = float(f.get_tensor(name + alpha_suffix))
    return a / down.shape[0] * (up @ down)


def test_merge_lora_models_on_kohya_sdxl(tmp_path):
    da, db = kohya_file(tmp_path / "a.safetensors", 1), kohya_file(tmp_path / "b.safetensors", 20)
    out = merge_lora_models(tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "m.safetensors",
                            ".lora_up.weight", ".lora_down.weight", ".alpha", 1e-12, 4, 32, 0.99)
    for n in NAMES[:2]:
        T = 0.5 * da[n] + 0.5 * db[n]
        assert rel(dense_file(out, n, ".lora_up.weight", ".lora_down.weight", ".alpha"), T) < 2e-3  # fp16 file
    fixed = merge_lora_models(tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "f.safetensors",
                              min_rank=6, max_rank=6, energy_threshold=1.0)
    assert {m.rank for m in load_lora(fixed).modules.values()} == {6}
    with pytest.raises(OutputExistsError):
        merge_lora_models(tmp_path / "a.safetensors", tmp_path / "b.safetensors", out)


def test_merge_lora_models_on_peft_folders_writes_a_peft_folder(tmp_path):
    da, db = peft_folder(tmp_path / "piqa", 1), peft_folder(tmp_path / "siqa", 30, r=4, alpha=8.0)
    out = merge_lora_models(tmp_path / "piqa", tmp_path / "siqa", tmp_path / "merged", ".lora_B.weight",
                            ".lora_A.weight", ".alpha")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["lora_alpha"] == config["r"] and config["peft_type"] == "LORA"
    merged = load_lora(out)  # reads alpha (= rank) back from adapter_config.json
    assert merged.profile == "peft" and set(merged.modules) == set(LLM)
    for n in LLM:
        assert rel(dense(merged.modules[n]), 0.5 * da[n] + 0.5 * db[n]) < 2e-3


def test_conventional_methods_one_file_each(tmp_path):
    da, db = kohya_file(tmp_path / "a.safetensors", 1), kohya_file(tmp_path / "b.safetensors", 20)
    methods = {"M_Concatenate": None, "M_Geometric_mean": None, "M_SVD": None, "M_Weighted_avg": None}
    written = merge_lora_adapters_covention(tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "out",
                                            methods, ".lora_up.weight", ".lora_down.weight", ".alpha", 0.3)
    assert {k: v.name for k, v in written.items()} == {k: f"{k}.safetensors" for k in methods}
    n = NAMES[0]
    read = lambda key: dense_file(written[key], n, ".lora_up.weight", ".lora_down.weight", ".alpha")  # noqa: E731
    assert rel(read("M_Concatenate"), da[n] + db[n]) < 2e-3
    svd_err = rel(read("M_SVD"), da[n] + db[n])
    assert svd_err == pytest.approx(optimal_error(da[n] + db[n], 8), abs=2e-3)
    avg = 0.3 * da[n] + 0.7 * db[n]
    assert rel(read("M_Weighted_avg"), avg) == pytest.approx(optimal_error(avg, 8), abs=2e-3)
    assert load_lora(written["M_Geometric_mean"]).modules[n].rank == 8
    listed = merge_lora_adapters_covention(tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "o2",
                                           ["M_SVD", "rsvd"])
    assert sorted(listed) == ["M_SVD", "rsvd"]
    with pytest.raises(MergeCoreError, match="unknown merge method 'M_Magic'"):
        merge_lora_adapters_covention(tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "o3",
                                      ["M_Magic"])
