"""Extraction inputs: .pt only through weights_only (code-running pickles refused, the code never runs),
shard folders, ComfyUI-internal keys, generic (LLM-style) state dicts whose names round-trip through
load_lora(profile="kohya"), in-memory sources left untouched, streamed output identical to MergeResult.save."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from extract_bake_fixtures import decaying
from merge_core.errors import InputFileError
from merge_core.extract import DictSource, extract_lora, extract_to_file
from merge_core.files.metadata import RECIPE_KEY
from merge_core.lora_file import load_lora
from merge_core.lowrank import RankRule

CKPT = {
    "model.diffusion_model.input_blocks.4.1.proj_in.weight": (40, 40),
    "model.diffusion_model.input_blocks.4.1.proj_in.bias": (40,),
    "model.diffusion_model.out.0.weight": (40,),
    "conditioner.embedders.0.transformer.text_model.encoder.layers.0.mlp.fc1.weight": (64, 24),
    "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": (24,),
}
COMFY = {  # the same layers as ComfyUI's ModelPatcher / CLIP patcher name them
    "diffusion_model.input_blocks.4.1.proj_in.weight": (40, 40),
    "diffusion_model.input_blocks.4.1.proj_in.bias": (40,),
    "diffusion_model.out.0.weight": (40,),
    "clip_l.transformer.text_model.encoder.layers.0.mlp.fc1.weight": (64, 24),
    "clip_l.transformer.text_model.final_layer_norm.weight": (24,),
}
NAMES = {"lora_unet_input_blocks_4_1_proj_in", "lora_unet_out_0", "lora_te1_text_model_encoder_layers_0_mlp_fc1",
         "text_encoders.clip_l.transformer.text_model.final_layer_norm"}


def make_pair(shapes: dict, seed: int = 0) -> tuple[dict, dict]:
    gen = torch.Generator().manual_seed(seed)
    base, tuned = {}, {}
    for key, shape in shapes.items():
        w = torch.randn(shape, generator=gen)
        d = decaying(shape[0], w[0].numel(), gen, 3.0).reshape(shape) if len(shape) >= 2 else \
            0.1 * torch.randn(shape, generator=gen)
        base[key], tuned[key] = w, w + d
    return base, tuned


@pytest.mark.parametrize("wrapper", ["state_dict", "model"])
def test_pt_inputs_load_through_weights_only(tmp_path, wrapper):
    base, tuned = make_pair(CKPT)
    torch.save(base, tmp_path / "base.pt")
    torch.save({wrapper: tuned, "epoch": 3}, tmp_path / "tuned.ckpt")
    save_file(base, str(tmp_path / "base.safetensors"))
    a = extract_lora(tmp_path / "base.pt", tmp_path / "tuned.ckpt", RankRule(rank=4), device="cpu")
    b = extract_lora(tmp_path / "base.safetensors", DictSource(tuned), RankRule(rank=4), device="cpu")
    assert set(a.modules) == set(b.modules) == NAMES
    for name in NAMES:
        for role, t in a.modules[name].tensors().items():
            torch.testing.assert_close(t, b.modules[name].tensors()[role])


class RunsCode:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


def test_pickle_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "code_ran"
    evil = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(2), "x": RunsCode(marker)}, evil)
    base, _ = make_pair(CKPT)
    save_file(base, str(tmp_path / "base.safetensors"))
    with pytest.raises(InputFileError, match="evil.pt"):
        extract_lora(tmp_path / "base.safetensors", evil, device="cpu")
    assert not marker.exists()


def test_type_flags_check_the_file_kind(tmp_path):
    base, tuned = make_pair(CKPT)
    save_file(base, str(tmp_path / "b.safetensors"))
    torch.save(tuned, tmp_path / "t.pt")
    with pytest.raises(InputFileError, match="--target-model safetensors"):
        extract_lora(tmp_path / "b.safetensors", tmp_path / "t.pt", tuned_kind="safetensors")
    with pytest.raises(InputFileError, match="--source-model pytorch"):
        extract_lora(tmp_path / "b.safetensors", tmp_path / "t.pt", base_kind="pytorch")


def test_shard_folders_and_comfyui_keys_give_the_same_lora(tmp_path):
    base, tuned = make_pair(CKPT)
    shards = tmp_path / "tuned"
    shards.mkdir()
    keys = list(tuned)
    save_file({k: tuned[k] for k in keys[:2]}, str(shards / "model-00001-of-00002.safetensors"))
    save_file({k: tuned[k] for k in keys[2:]}, str(shards / "model-00002-of-00002.safetensors"))
    from_ckpt = extract_lora(DictSource(base), shards, RankRule(rank=4), device="cpu")
    rename = dict(zip(CKPT, COMFY))
    base_c = {rename[k]: v for k, v in base.items()}
    before = {k: v.clone() for k, v in base_c.items()}
    from_comfy = extract_lora(DictSource(base_c), DictSource({rename[k]: v for k, v in tuned.items()}),
                              RankRule(rank=4), device="cpu")
    assert set(from_ckpt.modules) == set(from_comfy.modules) == NAMES
    for name in NAMES:
        for role, t in from_ckpt.modules[name].tensors().items():
            torch.testing.assert_close(t, from_comfy.modules[name].tensors()[role])
    assert all(torch.equal(before[k], base_c[k]) for k in base_c)  # in-memory weights untouched


def test_generic_state_dict_names_round_trip_through_kohya_profile(tmp_path):
    shapes = {"model.layers.0.self_attn.q_proj.weight": (48, 32), "model.layers.0.mlp.down_proj.weight": (32, 80),
              "model.layers.0.input_layernorm.weight": (32,), "lm_head.weight": (50, 32), "lm_head.bias": (50,),
              "model.rotary.inv_freq_scale": ()}
    base, tuned = make_pair(shapes)
    res = extract_lora(DictSource(base), DictSource(tuned), RankRule(rank=6), device="cpu")
    assert set(res.modules) == {"model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj",
                                "model.layers.0.input_layernorm", "lm_head"}
    assert res.report.extra["skipped"] == {"scalar": 1}
    assert res.arch == "other" and res.profile == "kohya"
    res.save(tmp_path / "llm.safetensors", "fp32")
    keys = set(load_file(str(tmp_path / "llm.safetensors")))
    assert {"model.layers.0.self_attn.q_proj.lora_up.weight", "model.layers.0.self_attn.q_proj.alpha",
            "lm_head.diff_b", "model.layers.0.input_layernorm.diff"} <= keys
    back = load_lora(tmp_path / "llm.safetensors", profile="kohya")
    assert set(back.modules) == set(res.modules)
    for name, m in res.modules.items():
        for role, t in m.tensors().items():
            torch.testing.assert_close(back.modules[name].tensors()[role], t)


def test_streamed_file_equals_merge_result_save(tmp_path):
    base, tuned = make_pair(CKPT)
    args = dict(rule=RankRule(None, 0.95, 1, 8), device="cpu", seed=5)
    extract_lora(DictSource(base), DictSource(tuned), **args).save(tmp_path / "a.safetensors", "bf16")
    report = extract_to_file(DictSource(base), DictSource(tuned), tmp_path / "b.safetensors", "bf16", **args)
    a, b = load_file(str(tmp_path / "a.safetensors")), load_file(str(tmp_path / "b.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    metas = []
    for f in ("a", "b"):
        with safe_open(str(tmp_path / f"{f}.safetensors"), "pt") as fh:
            meta = fh.metadata()
        recipe = json.loads(meta.pop(RECIPE_KEY))
        recipe.pop("created")
        meta.pop("modelspec.title")
        metas.append((meta, recipe))
    assert metas[0] == metas[1]
    assert metas[0][1]["parameters"]["energy"] == 0.95
    assert report.as_dict()["modules"]


def test_diff_only_output_is_written_as_it_is_made(tmp_path):
    """Each layer's diff is in the output file before the next layer is read: memory is one layer."""
    shapes = {f"model.diffusion_model.input_blocks.{i}.0.weight": (256, 256) for i in range(12)}
    base, tuned = make_pair(shapes)
    sizes = []

    class Watched(DictSource):
        def get(self, key):
            tmp = list(tmp_path.glob(".d.safetensors.*.tmp"))
            sizes.append(tmp[0].stat().st_size if tmp else 0)
            return super().get(key)

    extract_to_file(DictSource(base), Watched(tuned), tmp_path / "d.safetensors", "fp32", diff_only=True,
                    device="cpu")
    layer, run = 256 * 256 * 4, sizes[-12:]  # the first 12 reads were shape() calls of the plan
    assert all(run[i] >= i * layer for i in range(12))
    out = load_file(str(tmp_path / "d.safetensors"))
    assert len(out) == 12
    for i in range(12):
        key = f"model.diffusion_model.input_blocks.{i}.0.weight"
        torch.testing.assert_close(out[f"lora_unet_input_blocks_{i}_0.diff"], tuned[key] - base[key])


def _every_dtype() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    t = {"f32": torch.randn(5, 7, generator=gen), "f16": torch.randn(9, generator=gen).half(),
         "bf16": torch.randn(3, 3, 3, generator=gen).bfloat16(), "f64": torch.randn(4, generator=gen).double(),
         "i64": torch.arange(-3, 3), "i8": torch.tensor([-1, 2, 127], dtype=torch.int8),
         "u8": torch.tensor([0, 255], dtype=torch.uint8), "b": torch.tensor([True, False, True]),
         "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4),
         "f8": torch.randn(6, generator=gen).to(torch.float8_e4m3fn)}
    return t


def test_get_reads_what_safetensors_reads_in_any_dtype_from_any_thread(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from merge_core.files import TensorSource

    tensors = _every_dtype()
    save_file(tensors, str(tmp_path / "m.safetensors"))
    ref = load_file(str(tmp_path / "m.safetensors"))
    src = TensorSource(tmp_path / "m.safetensors")
    keys = list(ref) * 8
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(src.get, keys))
    for key, t in zip(keys, got):
        assert t.dtype == ref[key].dtype and t.shape == ref[key].shape
        assert torch.equal(t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t,
                           ref[key].view(torch.uint8) if t.dtype == torch.float8_e4m3fn else ref[key])
    src.close()
    assert torch.equal(src.get("f32"), ref["f32"])  # opened again after close
    src.close()


def test_get_on_a_file_cut_short_after_opening_is_one_clear_line(tmp_path):
    from merge_core.files import TensorSource

    path = tmp_path / "m.safetensors"
    save_file({"a": torch.ones(1000), "b": torch.ones(1000)}, str(path))
    src = TensorSource(path)
    with open(path, "r+b") as fh:  # e.g. another program rewriting the file mid-run
        fh.truncate(path.stat().st_size - 100)
    with pytest.raises(InputFileError, match="truncated file: tensor '.' has 3900 of its 4000 bytes"):
        src.get("b")
    src.close()


@pytest.mark.skipif(not __import__("os").path.isdir("/proc/self/fd"), reason="needs /proc to list open files")
def test_close_releases_the_files_get_opened(tmp_path):
    import os

    from merge_core.files import TensorSource

    path = tmp_path / "m.safetensors"
    save_file({"a": torch.ones(3)}, str(path))

    def open_here() -> int:
        return sum(os.path.realpath(f"/proc/self/fd/{fd}") == str(path.resolve()) for fd in os.listdir("/proc/self/fd")
                   if os.path.exists(f"/proc/self/fd/{fd}"))

    src = TensorSource(path)
    src.get("a")
    assert open_here() == 1
    src.close()
    assert open_here() == 0


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/maps"), reason="needs /proc to list mappings")
def test_get_holds_no_map_of_the_file(tmp_path):
    """Streaming a checkpoint must not keep the file mapped: a kept-open map counted every page a bake or
    an extract had touched in its RSS (13 GiB for two SDXL checkpoints)."""
    from merge_core.files import TensorSource

    path = tmp_path / "ckpt.safetensors"
    save_file({f"w{i}": torch.randn(256, 256) for i in range(8)}, str(path))
    src = TensorSource(path)
    got = [src.get(f"w{i}") for i in range(8)]  # held while the mappings are listed
    mapped = [line for line in open("/proc/self/maps") if line.rstrip().endswith(str(path.resolve()))]
    assert mapped == [] and len(got) == 8
    src.close()
