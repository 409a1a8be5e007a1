"""Key profiles: every profile round-trips (read → write → read gives the same deltas), aliases map to
kohya names, and `auto` tells SDXL, SD1.5, PEFT and other models apart."""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from merge_core.adapters import LoHa, LoKr
from merge_core.errors import FormatError, NonFiniteError
from merge_core.keys import Suffixes
from merge_core.keys.sdxl_table import sdxl_modules
from merge_core.lora_file import load_lora, save_lora, state_dict_of
from merge_core.merge import merge_loras
from synth import lora_for, randn, sdxl_lora, sdxl_specs


def same_deltas(a: dict, b: dict):
    assert set(a) == set(b)
    for name in a:
        da, db = a[name].delta(), b[name].delta()
        assert da.shape == db.shape, name
        assert torch.allclose(da, db, atol=1e-6, rtol=1e-5), name


def test_sdxl_table_has_the_986_lora_modules_and_locon_extras():
    specs = sdxl_modules().values()
    groups = {g: sum(1 for s in specs if s.group == g and not s.locon) for g in ("unet", "te1", "te2")}
    assert groups == {"unet": 722, "te1": 72, "te2": 192}
    assert any(s.locon and s.kind == "conv" and s.shape[2:] == (3, 3) for s in specs)
    spec = sdxl_modules()["lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"]
    assert spec.shape == (640, 2048) and spec.block == "IN04"


def test_sdxl_round_trip_with_locon_and_lycoris(tmp_path):
    specs = sdxl_specs(per_group=3, locon=True)
    mods = sdxl_lora(specs, rank=4, alpha=2.0)
    lin = next(s for s in specs if s.kind == "linear" and s.group == "unet")
    mods[lin.name] = LoHa(randn(lin.shape[0], 2, seed=1), randn(2, lin.shape[1], seed=2),
                          randn(lin.shape[0], 2, seed=3), randn(2, lin.shape[1], seed=4), alpha=1.0)
    te = next(s for s in specs if s.group == "te2")
    mods[te.name] = LoKr(w1=randn(4, 4, seed=5), w2a=randn(te.shape[0] // 4, 2, seed=6),
                         w2b=randn(2, te.shape[1] // 4, seed=7), alpha=1.0)
    path = save_lora(mods, tmp_path / "a.safetensors", dtype="fp32")
    back = load_lora(path)
    assert back.profile == "sdxl" and back.arch == "sdxl"
    same_deltas(mods, back.modules)
    assert back.metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lycoris"


def test_sdxl_diffusers_and_comfy_names_read_as_kohya(tmp_path):
    table = sdxl_modules()
    q = table["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"]
    out = table["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_out_0"]
    ff = table["lora_unet_output_blocks_2_1_transformer_blocks_3_ff_net_2"]
    te1 = table["lora_te1_text_model_encoder_layers_3_mlp_fc1"]
    te2 = table["lora_te2_text_model_encoder_layers_30_self_attn_v_proj"]
    m = {s.name: lora_for(s.shape, 2, 1.0, seed=i) for i, s in enumerate((q, out, ff, te1, te2))}
    sd = {}
    names = {q.name: ("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor.to_q", "_lora.{}.weight"),
             out.name: ("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor.to_out", "_lora.{}.weight"),
             ff.name: ("diffusion_model.output_blocks.2.1.transformer_blocks.3.ff.net.2", ".lora_{}.weight"),
             te1.name: ("text_encoder.text_model.encoder.layers.3.mlp.fc1", ".lora_linear_layer.{}.weight"),
             te2.name: ("lora_te2_text_model_encoder_layers_30_self_attn_v_proj", ".lora_{}.weight")}
    for name, (prefix, pattern) in names.items():
        sd[prefix + pattern.format("up")] = m[name].up
        sd[prefix + pattern.format("down")] = m[name].down
        sd[prefix + ".alpha"] = torch.tensor(1.0)
    save_file(sd, str(tmp_path / "d.safetensors"))
    back = load_lora(tmp_path / "d.safetensors")
    assert back.profile == "sdxl"
    same_deltas(m, back.modules)
    # written back with kohya names only
    keys = state_dict_of(back.modules, Suffixes()).keys()
    assert all(k.startswith(("lora_unet_", "lora_te1_", "lora_te2_")) for k in keys)


def test_diffusers_peft_sdxl_names(tmp_path):
    q = sdxl_modules()["lora_unet_output_blocks_0_1_transformer_blocks_9_attn2_to_k"]
    m = lora_for(q.shape, 4, None, seed=3)
    sd = {"unet.up_blocks.0.attentions.0.transformer_blocks.9.attn2.to_k.lora_B.weight": m.up,
          "unet.up_blocks.0.attentions.0.transformer_blocks.9.attn2.to_k.lora_A.weight": m.down}
    save_file(sd, str(tmp_path / "p.safetensors"))
    back = load_lora(tmp_path / "p.safetensors")
    assert list(back.modules) == [q.name] and back.arch == "sdxl"
    same_deltas({q.name: m}, back.modules)


def test_peft_folder_round_trip_keeps_layout_and_scale(tmp_path):
    src = tmp_path / "adapter"
    src.mkdir()
    names = [f"base_model.model.model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    mods = {n: lora_for((64, 48), 8 if "q_proj" in n else 4, None, seed=i) for i, n in enumerate(names)}
    sd = {}
    for n, m in mods.items():
        sd[f"{n}.lora_B.weight"], sd[f"{n}.lora_A.weight"] = m.up, m.down
    save_file(sd, str(src / "adapter_model.safetensors"))
    (src / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 8, "lora_alpha": 16, "rank_pattern": {"v_proj": 4}, "alpha_pattern": {"v_proj": 2},
        "target_modules": ["q_proj", "v_proj"], "base_model_name_or_path": "tiny-llm"}))
    lset = load_lora(src)
    assert lset.profile == "peft" and lset.arch == "other"
    for n, m in mods.items():
        expected = (16 / 8) if "q_proj" in n else (2 / 4)
        assert lset.modules[n].scale == pytest.approx(expected)
        assert torch.allclose(lset.modules[n].delta(), expected * m.up @ m.down, atol=1e-6)
    out = save_lora(lset.modules, tmp_path / "out", arch="other", profile="peft", dtype="fp32",
                    peft_config=lset.peft_config)
    assert (out / "adapter_model.safetensors").exists() and (out / "adapter_config.json").exists()
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "tiny-llm"
    same_deltas(lset.modules, load_lora(out).modules)


def test_peft_folder_refuses_values_beyond_fp16_and_writes_nothing(tmp_path):
    name = "base_model.model.model.layers.0.self_attn.q_proj"
    m = lora_for((16, 12), 2, 4.0)  # α/r = 2 is folded into lora_B: 6e4 becomes 1.2e5
    m.up[0, 0] = 6e4
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}
    with pytest.raises(NonFiniteError, match=rf"^'{name}.lora_B.weight' holds values up to 120000, beyond float16's range"):
        save_lora({name: m}, tmp_path / "out", arch="other", profile="peft", peft_config=config)
    assert not list(tmp_path.iterdir())


def peft_with_embedding(path, seed: int, r: int) -> dict:
    """A PEFT folder with a LoRA on embed_tokens (lora_embedding_A r×vocab, _B dim×r) and one on q_proj; the
    dense deltas by PEFT's definitions: (B·A)ᵀ·α/r for the embedding, B·A·α/r for the linear layer."""
    path.mkdir()
    g = torch.Generator().manual_seed(seed)
    A, B = torch.randn(r, 50, generator=g), torch.randn(16, r, generator=g)
    qa, qb = torch.randn(r, 16, generator=g), torch.randn(24, r, generator=g)
    emb, q = "base_model.model.model.embed_tokens", "base_model.model.model.layers.0.self_attn.q_proj"
    save_file({f"{emb}.lora_embedding_A": A, f"{emb}.lora_embedding_B": B, f"{q}.lora_A.weight": qa,
               f"{q}.lora_B.weight": qb}, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": r, "lora_alpha": 2 * r,
                                                          "target_modules": ["embed_tokens", "q_proj"]}))
    return {emb: 2.0 * (B.double() @ A.double()).T, q: 2.0 * qb.double() @ qa.double()}


def test_peft_embedding_loras_are_read_merged_and_written_back_as_embeddings(tmp_path):
    da, db = peft_with_embedding(tmp_path / "a", 1, 4), peft_with_embedding(tmp_path / "b", 2, 8)
    sets = [load_lora(tmp_path / "a"), load_lora(tmp_path / "b")]
    emb = "base_model.model.model.embed_tokens"
    assert sets[0].peft_embeddings == {emb} and sets[0].modules[emb].weight_shape == (50, 16)
    for name, delta in da.items():
        assert torch.allclose(sets[0].modules[name].delta().double(), delta, atol=1e-4)
    out = merge_loras(sets, "concat").save(tmp_path / "merged", dtype="fp32")
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert shapes[f"{emb}.lora_embedding_A"] == (12, 50) and shapes[f"{emb}.lora_embedding_B"] == (16, 12)
    assert not any(k.startswith(emb + ".lora_A") or k.startswith(emb + ".lora_B") for k in shapes)
    back = load_lora(out)
    assert back.peft_embeddings == {emb}
    for name in da:
        assert torch.allclose(back.modules[name].delta().double(), da[name] + db[name], rtol=1e-5, atol=1e-4)


def test_peft_lora_bias_is_a_bias_delta_and_is_written_back(tmp_path):
    """lora_bias=True: lora_B's bias b adds (α/r)·b to the layer's bias; merged biases sum exactly."""
    names = [f"base_model.model.model.layers.0.self_attn.{p}" for p in ("q_proj", "v_proj")]
    biases = {}
    for folder, seed in (("a", 1), ("b", 2)):
        (tmp_path / folder).mkdir()
        sd = {}
        for i, n in enumerate(names):
            m = lora_for((24, 16), 4, None, seed=seed + i)
            sd.update({f"{n}.lora_B.weight": m.up, f"{n}.lora_A.weight": m.down})
            if n.endswith("q_proj"):  # v_proj has none: written back as zeros
                sd[f"{n}.lora_B.bias"] = biases[folder] = torch.randn(24, generator=torch.Generator().manual_seed(seed))
        save_file(sd, str(tmp_path / folder / "adapter_model.safetensors"))
        (tmp_path / folder / "adapter_config.json").write_text(json.dumps(
            {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "lora_bias": True, "target_modules": ["q_proj", "v_proj"]}))
    sets = [load_lora(tmp_path / f) for f in ("a", "b")]
    assert torch.equal(sets[0].modules[names[0]].diff_b, 2.0 * biases["a"])
    out = merge_loras(sets, "concat", weights=[1.0, -0.5]).save(tmp_path / "merged", dtype="fp32")
    assert json.loads((out / "adapter_config.json").read_text())["lora_bias"] is True
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        assert torch.allclose(f.get_tensor(f"{names[0]}.lora_B.bias"), 2.0 * biases["a"] - 1.0 * biases["b"])
        assert torch.equal(f.get_tensor(f"{names[1]}.lora_B.bias"), torch.zeros(24))
    assert torch.allclose(load_lora(out).modules[names[0]].diff_b, 2.0 * biases["a"] - 1.0 * biases["b"])


def test_peft_modules_to_save_are_refused_by_name(tmp_path):
    src = tmp_path / "adapter"
    src.mkdir()
    m = lora_for((64, 48), 4, None)
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": m.up,
               "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": m.down,
               "base_model.model.lm_head.weight": torch.zeros(10, 48)}, str(src / "adapter_model.safetensors"))
    (src / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                         "target_modules": ["q_proj"], "modules_to_save": ["lm_head"]}))
    with pytest.raises(FormatError, match="whole trained layers, not deltas: 'base_model.model.lm_head.weight' "
                                          r"\(adapter_config.json modules_to_save: lm_head\)"):
        load_lora(src)


def test_custom_suffixes_round_trip(tmp_path):
    suffixes = Suffixes(".up_w", ".down_w", ".scale_a")
    mods = {f"layer{i}.proj": lora_for((32, 24), 4, 2.0, seed=i) for i in range(3)}
    path = save_lora(mods, tmp_path / "c.safetensors", arch="other", profile="custom", suffixes=suffixes, dtype="fp32")
    lset = load_lora(path, profile="custom", suffixes=suffixes)
    assert lset.profile == "custom"
    same_deltas(mods, lset.modules)


def test_kohya_profile_round_trip_sd15(tmp_path):
    mods = {"lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k": lora_for((640, 768), 4, 1.0),
            "lora_te_text_model_encoder_layers_0_self_attn_q_proj": lora_for((768, 768), 4, 1.0, seed=2)}
    path = save_lora(mods, tmp_path / "s.safetensors", arch="sd15", profile="kohya", dtype="fp32")
    lset = load_lora(path)
    assert (lset.profile, lset.arch) == ("kohya", "sd15")
    assert lset.metadata["ss_base_model_version"] == "sd_v1"
    same_deltas(mods, lset.modules)


def test_pt_output_round_trip(tmp_path):
    mods = sdxl_lora(sdxl_specs(per_group=2), rank=3)
    path = save_lora(mods, tmp_path / "x.pt", dtype="fp32")
    same_deltas(mods, load_lora(path).modules)


def test_auto_on_sdxl_names_with_wrong_shapes_is_not_sdxl_and_sdxl_profile_refuses(tmp_path):
    name = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"
    save_lora({name: lora_for((640, 768), 2, 1.0)}, tmp_path / "w.safetensors", arch="other", profile="kohya")
    assert load_lora(tmp_path / "w.safetensors").arch == "sd15"
    with pytest.raises(FormatError, match=r"shape \(640, 768\).*\(640, 2048\)"):
        load_lora(tmp_path / "w.safetensors", profile="sdxl")


def test_unknown_keys_are_a_clear_error(tmp_path):
    save_file({"model.layers.0.weight": torch.zeros(2, 2)}, str(tmp_path / "u.safetensors"))
    with pytest.raises(FormatError, match="unknown key layout.*model.layers.0.weight"):
        load_lora(tmp_path / "u.safetensors")


def test_dora_is_detected_and_refused_unless_dropped(tmp_path):
    from merge_core.errors import DoraError
    m = lora_for((64, 32), 4, 4.0)
    m.dora_scale = torch.ones(64, 1)
    save_lora({"lora_unet_x": m}, tmp_path / "dora.safetensors", arch="other", profile="kohya")
    lset = load_lora(tmp_path / "dora.safetensors")
    assert lset.dora_modules() == ["lora_unet_x"]
    with pytest.raises(DoraError, match="DoRA"):
        lset.require_no_dora("merged")
    lset.drop_dora()
    lset.require_no_dora("merged")


def test_sdxl_extras_outside_the_table_keep_the_file_sdxl(tmp_path):
    from merge_core.adapters import FullDiff
    q = sdxl_modules()["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"]
    mods = {q.name: lora_for(q.shape, 2, 1.0),
            "lora_unet_input_blocks_0_0": FullDiff(randn(320, 4, 3, 3, seed=1)),
            "text_encoders.clip_l.transformer.text_model.final_layer_norm": FullDiff(randn(768, seed=2))}
    path = save_lora(mods, tmp_path / "x.safetensors", dtype="fp32")
    lset = load_lora(path)
    assert (lset.profile, lset.arch) == ("sdxl", "sdxl")
    same_deltas(mods, lset.modules)
    assert load_lora(path, profile="sdxl").arch == "sdxl"


def test_two_tensors_for_one_role_of_a_module_are_refused():
    from merge_core.keys.suffixes import group_keys

    name = "lora_unet_input_blocks_4_1_proj_in"
    with pytest.raises(FormatError, match=f"module '{name}' has two tensors for its lora_up.weight"):
        group_keys([f"{name}.lora_up.weight", f"{name}.lora_down.weight", f"{name}.lora_B.weight"])


def test_peft_profile_refuses_a_kohya_file_instead_of_writing_peft_suffixes_on_kohya_names(tmp_path):
    mods = sdxl_lora(sdxl_specs(per_group=1), rank=2)
    path = save_lora(mods, tmp_path / "k.safetensors", dtype="fp32")
    with pytest.raises(FormatError, match="profile peft reads PEFT adapters.*'lora_unet_.*kohya name"):
        load_lora(path, profile="peft")
    sd = {k: v for k, v in load_file(str(path)).items()}  # one module renamed to lora_A/lora_B: still refused
    name = next(k for k in sd if k.endswith(".lora_up.weight"))[:-len(".lora_up.weight")]
    sd[f"{name}.lora_B.weight"], sd[f"{name}.lora_A.weight"] = sd.pop(f"{name}.lora_up.weight"), \
        sd.pop(f"{name}.lora_down.weight")
    save_file(sd, str(tmp_path / "mixed.safetensors"))
    with pytest.raises(FormatError, match="profile peft reads PEFT adapters.*kohya name"):
        load_lora(tmp_path / "mixed.safetensors", profile="peft")


def wan_pair(tmp_path):
    """A Wan Fun LoRA (`lora_unet__blocks_…`, its marker module included) and a kohya Wan LoRA of the same two
    layers; the Fun one's tensors by its own keys."""
    paths = ("blocks_0_cross_attn_k", (64, 48)), ("blocks_0_self_attn_q", (64, 64))
    fun = {f"lora_unet__{p}": lora_for(shape, 4, 2.0, seed=i) for i, (p, shape) in enumerate(paths)}
    kohya = {f"lora_unet_{p}": lora_for(shape, 2, 1.0, seed=9 + i) for i, (p, shape) in enumerate(paths)}
    return (save_lora(fun, tmp_path / "fun.safetensors", arch="other", profile="kohya", dtype="fp32"), fun,
            save_lora(kohya, tmp_path / "k.safetensors", arch="other", profile="kohya", dtype="fp32"), kohya)


def test_wan_fun_names_are_read_as_comfyui_reads_them_and_merge_with_kohya_ones(tmp_path, caplog):
    fun_path, fun, kohya_path, kohya = wan_pair(tmp_path)
    fun_set = load_lora(fun_path)
    assert set(fun_set.modules) == set(kohya)  # lora_unet__… -> lora_unet_…, as comfy/lora_convert.py does
    with caplog.at_level("WARNING"):
        result = merge_loras([fun_set, load_lora(kohya_path)], "concat", weights=[1.0, -0.5])
    assert caplog.records == []  # every module shared
    for name, m in result.modules.items():
        want = fun["lora_unet__" + name[len("lora_unet_"):]].delta() - 0.5 * kohya[name].delta()
        assert torch.allclose(m.delta(), want, atol=1e-5), name


def test_double_underscore_names_without_wan_funs_marker_are_kept(tmp_path):
    mods = {"lora_unet__blocks_1_ffn_0": lora_for((32, 16), 2, 1.0)}
    path = save_lora(mods, tmp_path / "x.safetensors", arch="other", profile="kohya", dtype="fp32")
    assert set(load_lora(path).modules) == set(mods)  # ComfyUI renames only files holding the marker module


def test_a_file_holding_a_module_under_both_wan_names_is_refused(tmp_path):
    mods = {"lora_unet__blocks_0_cross_attn_k": lora_for((64, 48), 2, 1.0),
            "lora_unet_blocks_0_cross_attn_k": lora_for((64, 48), 2, 1.0, seed=1)}
    path = save_lora(mods, tmp_path / "x.safetensors", arch="other", profile="kohya", dtype="fp32")
    with pytest.raises(FormatError, match="holds module 'lora_unet_blocks_0_cross_attn_k' twice"):
        load_lora(path)
