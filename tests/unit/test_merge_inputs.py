"""What merge accepts and refuses: mixed formats (kohya + diffusers/PEFT names), mixed ranks, LoCon 3x3, fp8 files,
N = 5 inputs, negative weights, modules missing in one input, bias deltas, SDXL block weights (20 and 12
values), DoRA (kohya dora_scale and PEFT lora_magnitude_vector), SD1.5 with SDXL and other shape clashes
(refused before any work, naming the module)."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from merge_core.errors import DoraError, MergeCoreError, ShapeMismatchError
from merge_core.keys.sdxl_table import sdxl_modules
from merge_core.lora_file import load_lora
from merge_core.lowrank import RankRule
from merge_core.merge import merge_loras, parse_block_weights
from merge_testlib import one_torch_thread  # noqa: F401  (autouse)
from merge_testlib import CONV, F64, NAMES, cli_inputs, dense, gen, lora_set, random_lora, rel, shape_of, target

EXACT = RankRule(energy=1.0, min_rank=1, max_rank=128)


def raw(shape, rank, seed):
    out, inn, kernel = shape[0], shape[1], tuple(shape[2:])
    return (torch.randn(out, rank, *([1] * len(kernel)), generator=gen(seed)) * 0.1,
            torch.randn(rank, inn, *kernel, generator=gen(seed + 1)) * 0.1)


def diffusers_prefix(name: str) -> str:
    spec = sdxl_modules()[name]
    if spec.group == "unet":
        return "unet." + spec.diffusers
    inner = spec.key.split(".transformer.", 1)[1][: -len(".weight")]
    return ("text_encoder." if spec.group == "te1" else "text_encoder_2.") + inner


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A kohya file (rank 64, alpha 32, with a 3x3 LoCon) and a PEFT-named diffusers file (rank 32, no alpha,
    without the conv module), plus the dense deltas computed here from the raw tensors."""
    d = tmp_path_factory.mktemp("merge_inputs")
    ka, kb, deltas_a, deltas_b = {}, {}, {}, {}
    for i, n in enumerate(NAMES + [CONV]):
        up, down = raw(shape_of(n), 64, seed=i)
        ka.update({f"{n}.lora_up.weight": up, f"{n}.lora_down.weight": down, f"{n}.alpha": torch.tensor(32.0)})
        deltas_a[n] = 0.5 * up.flatten(1).to(F64) @ down.flatten(1).to(F64)
    for i, n in enumerate(NAMES):
        up, down = raw(shape_of(n), 32, seed=100 + i)
        p = diffusers_prefix(n)
        kb.update({f"{p}.lora_B.weight": up, f"{p}.lora_A.weight": down})
        deltas_b[n] = up.to(F64) @ down.to(F64)
    save_file(ka, str(d / "kohya.safetensors"))
    save_file(kb, str(d / "diffusers.safetensors"))
    return d / "kohya.safetensors", d / "diffusers.safetensors", deltas_a, deltas_b


@pytest.mark.parametrize("method", ["rsvd", "concat"])
def test_kohya_with_diffusers_names_mixed_ranks_and_a_missing_conv(files, method):
    a, b = load_lora(files[0]), load_lora(files[1])
    assert a.arch == b.arch == "sdxl" and set(b.modules) == set(NAMES)
    w = [0.6, -0.3]
    r = merge_loras([a, b], method, weights=w, rule=EXACT if method == "rsvd" else None, device="cpu")
    assert r.profile == "sdxl" and set(r.modules) == set(NAMES + [CONV])
    for n in NAMES:
        assert rel(dense(r.modules[n]), w[0] * files[2][n] + w[1] * files[3][n]) < 1e-5
    conv = r.modules[CONV]
    assert tuple(conv.down.shape) == (conv.rank, 320, 3, 3)
    assert rel(dense(conv), w[0] * files[2][CONV]) < 1e-5  # carried as a scaled copy
    assert {x.name: x.note for x in r.report.modules}[CONV] == "in 1 of 2 inputs"


@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("method", ["rsvd", "concat"])
def test_an_fp8_file_merges_with_an_fp16_one_as_its_exact_fp16_widening(tmp_path, fp8, method):
    """fp8 LoRAs exist (half the size); torch promotes fp8 with no other dtype, and every fp8 value is exact in
    fp16, so the merge must equal the merge of the file widened to fp16.  Ranks 8 and 4: the two 640×640
    modules go through the Gram core together, which joins each module's blocks of mixed dtypes."""
    a, b = cli_inputs(tmp_path)
    stored = {k: v.to(fp8) if v.ndim > 1 else v for k, v in load_file(str(a)).items()}
    save_file(stored, str(tmp_path / "fp8.safetensors"))
    save_file({k: v.half() if v.ndim > 1 else v for k, v in stored.items()}, str(tmp_path / "fp16.safetensors"))
    b16 = {k: v.half() if v.ndim > 1 else v for k, v in load_file(str(b)).items()}
    save_file(b16, str(tmp_path / "b16.safetensors"))
    merged = [merge_loras([load_lora(tmp_path / f), load_lora(tmp_path / "b16.safetensors")], method,
                          device="cpu").modules for f in ("fp8.safetensors", "fp16.safetensors")]
    assert merged[0].keys() == merged[1].keys() == set(NAMES + [CONV])
    for n in merged[0]:
        assert torch.equal(dense(merged[0][n]), dense(merged[1][n])), n


def test_five_inputs_with_negative_weights():
    sets = [lora_set({n: random_lora(shape_of(n), 4, float(j + 1), seed=20 * j + i) for i, n in enumerate(NAMES)})
            for j in range(5)]
    w = [0.4, -0.2, 0.3, -0.5, 1.0]
    r = merge_loras(sets, "rsvd", weights=w, rule=EXACT, device="cpu")
    for n in NAMES:
        assert r.modules[n].rank == 20
        assert rel(dense(r.modules[n]), target(sets, w, n)) < 1e-5


def test_default_weights_per_method():
    s = [lora_set({NAMES[0]: random_lora(shape_of(NAMES[0]), 4, None, seed=j)}) for j in range(4)]
    expect = {"rsvd": 0.25, "weighted_avg": 0.25, "svd": 1.0, "concat": 1.0, "geometric_mean": 1.0, "ties": 1.0,
              "dare": 1.0}
    for method, w in expect.items():
        r = merge_loras(s, method, device="cpu")
        assert r.report.extra["parameters"]["weights"] == [w] * 4
    assert merge_loras(s, "svd", device="cpu").modules[NAMES[0]].rank == 4  # largest input rank, fixed


def test_bias_deltas_are_summed_exactly():
    n = NAMES[0]
    m1, m2 = random_lora(shape_of(n), 4, None, 1), random_lora(shape_of(n), 4, None, 2)
    m1.diff_b, m2.diff_b = torch.ones(640), torch.arange(640.0)
    r = merge_loras([lora_set({n: m1}), lora_set({n: m2})], "rsvd", weights=[2.0, 0.5], device="cpu")
    assert torch.allclose(r.modules[n].diff_b, 2.0 + 0.5 * torch.arange(640.0))


def three_block_sets():
    """Two LoRAs on one module each of blocks IN04, BASE and IN01 (a LoCon conv)."""
    names = [NAMES[0], NAMES[3], CONV]
    assert [sdxl_modules()[n].block for n in names] == ["IN04", "BASE", "IN01"]
    return tuple(lora_set({n: random_lora(shape_of(n), 4, None, seed=first + i) for i, n in enumerate(names)})
                 for first in (0, 9))


def test_block_weights_20_and_12_values():
    a, b = three_block_sets()
    twenty = [1.0] * 20
    twenty[0], twenty[5] = 0.25, -1.0  # BASE, IN04
    r = merge_loras([a, b], "concat", block_weights=[twenty, None], device="cpu")
    assert rel(dense(r.modules[NAMES[0]]), -dense(a.modules[NAMES[0]]) + dense(b.modules[NAMES[0]])) < 1e-6
    assert rel(dense(r.modules[NAMES[3]]), 0.25 * dense(a.modules[NAMES[3]]) + dense(b.modules[NAMES[3]])) < 1e-6
    twelve = [1.0, 0.5] + [1.0] * 10  # BASE, IN04, ...; IN01 is not in the short form -> 0
    r = merge_loras([a, b], "concat", block_weights=[twelve, twelve], device="cpu")
    assert rel(dense(r.modules[NAMES[0]]), 0.5 * target([a, b], [1, 1], NAMES[0])) < 1e-6
    assert CONV not in r.modules


def test_block_weight_errors():
    a = lora_set({NAMES[0]: random_lora(shape_of(NAMES[0]), 4, None, 1)})
    with pytest.raises(MergeCoreError, match="SDXL takes 20 values .* or 12 .* Flux.1 takes 58 .* got 7 values"):
        merge_loras([a, a], block_weights=[[1.0] * 7, None])
    other = lora_set({"lora_unet_custom": random_lora((8, 8), 2, None, 1)}, arch="other")
    with pytest.raises(MergeCoreError, match="^20 block weights are SDXL's; input 1 is other$"):
        merge_loras([other, other], block_weights=[[1.0] * 20, None])
    with pytest.raises(MergeCoreError, match="^58 block weights are Flux's; input 1 has no Flux double or single"):
        merge_loras([a, a], block_weights=[[1.0] * 58, None])


def test_block_weights_by_name():
    """BLOCK=VALUE pairs: every block not named at 1, later pairs over earlier ones; the names say the model."""
    a, b = three_block_sets()
    named = parse_block_weights("IN=0, in04=0.5, BASE = 2, OUT00-OUT02=3")
    r = merge_loras([a, b], "concat", block_weights=[named, None], device="cpu")
    for name, scale in ((NAMES[0], 0.5), (NAMES[3], 2.0), (CONV, 0.0)):
        assert rel(dense(r.modules[name]), scale * dense(a.modules[name]) + dense(b.modules[name])) < 1e-6, name
    assert r.recipe["parameters"]["block_weights"] == ["IN=0, in04=0.5, BASE = 2, OUT00-OUT02=3", None]
    for text, message in (("BASE=0", "name the blocks of one model.*got BASE alone"),
                          ("D=1, IN=0", "name the blocks of one model.*got D, IN"),
                          ("IN04-OUT02=1", "must start and end in one group"),
                          ("X=1", "'X=1' is not BLOCK=VALUE"), ("D=abc", "'abc' in 'D=abc' is not a number"),
                          ("S=inf", "block weight S must be finite")):
        with pytest.raises(MergeCoreError, match=message):
            parse_block_weights(text)
    with pytest.raises(MergeCoreError, match=r"^block weights: input 1 has no block IN09 \(BASE, IN00-IN08, MID, "
                                             r"OUT00-OUT08\)$"):
        merge_loras([a, b], "concat", block_weights=[parse_block_weights("IN9=0"), None])
    with pytest.raises(MergeCoreError, match="^named block weights are Flux's; input 1 has no Flux double or single"):
        merge_loras([a, b], "concat", block_weights=[parse_block_weights("D=0"), None])


def test_dora_is_refused_unless_ignored():
    n = NAMES[0]
    m = random_lora(shape_of(n), 4, None, 1)
    m.dora_scale = torch.ones(640, 1)
    plain = random_lora(shape_of(n), 4, None, 2)
    with pytest.raises(DoraError, match="--dora ignore"):
        merge_loras([lora_set({n: m}), lora_set({n: plain})])
    r = merge_loras([lora_set({n: m}), lora_set({n: plain})], "concat", dora="ignore", device="cpu")
    assert r.modules[n].dora_scale is None
    assert rel(dense(r.modules[n]), dense(m) + dense(plain)) < 1e-6


def peft_dora_folder(path, seed: int, magnitude_key: str = "lora_magnitude_vector") -> dict:
    """A PEFT DoRA adapter folder (use_dora, r 8, alpha 16) and the dense low-rank deltas (the magnitude aside)."""
    path.mkdir()
    sd, deltas = {}, {}
    for i, (name, (out, inn)) in enumerate({"base_model.model.model.layers.0.self_attn.q_proj": (64, 64),
                                            "base_model.model.model.layers.0.mlp.down_proj": (64, 128)}.items()):
        B, A = torch.randn(out, 8, generator=gen(seed + i)), torch.randn(8, inn, generator=gen(seed + 7 + i))
        sd.update({f"{name}.lora_B.weight": B, f"{name}.lora_A.weight": A,
                   f"{name}.{magnitude_key}": torch.rand(out, generator=gen(seed + 3 + i)) + 0.5})
        deltas[name] = 2.0 * (B.to(F64) @ A.to(F64))
    save_file(sd, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16,
                                                          "use_dora": True, "target_modules": ["q_proj", "down_proj"]}))
    return deltas


def test_peft_dora_folders_are_recognised_refused_and_merged_without_magnitude(tmp_path):
    da = peft_dora_folder(tmp_path / "a", 1)
    db = peft_dora_folder(tmp_path / "b", 20, "lora_magnitude_vector.default.weight")  # a live model's naming
    sets = [load_lora(tmp_path / "a"), load_lora(tmp_path / "b")]
    assert all(len(s.dora_modules()) == 2 for s in sets)
    # PEFT keeps one magnitude per output row as a vector; held (and written) as kohya's (out, 1) column
    assert {tuple(m.dora_scale.shape) for s in sets for m in s.modules.values()} == {(64, 1)}
    with pytest.raises(DoraError, match="lora_magnitude_vector.*--dora ignore"):
        merge_loras(sets, "concat")
    result = merge_loras(sets, "concat", dora="ignore", device="cpu")
    out = result.save(tmp_path / "merged", overwrite=False)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["use_dora"] is False  # PEFT would otherwise build DoRA layers with no magnitudes to load
    merged = load_lora(out)
    assert not merged.dora_modules()
    for name, delta in da.items():
        assert rel(dense(merged.modules[name]), delta + db[name]) < 2e-3  # fp16 file


def test_sd15_with_sdxl_is_refused_before_any_work(tmp_path):
    sd15 = {"lora_te_text_model_encoder_layers_0_self_attn_q_proj": (768, 768),
            "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k": (640, 768)}
    sd = {}
    for i, (n, (o, k)) in enumerate(sd15.items()):
        up, down = raw((o, k), 4, seed=i)
        sd.update({f"{n}.lora_up.weight": up, f"{n}.lora_down.weight": down})
    save_file(sd, str(tmp_path / "sd15.safetensors"))
    a = load_lora(tmp_path / "sd15.safetensors")
    assert a.arch == "sd15"
    xl = lora_set({n: random_lora(shape_of(n), 4, None, seed=i) for i, n in enumerate(NAMES)})
    calls = []
    with pytest.raises(ShapeMismatchError, match="module 'lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k' "
                                                 "is 640x2048 in input 2 \\(SDXL\\) but 640x768 in .*sd15"):
        merge_loras([a, xl], progress=lambda *x: calls.append(x))
    assert calls == []


def test_same_name_different_shapes_is_refused_naming_the_module():
    a = lora_set({"lora_unet_x": random_lora((8, 8), 2, None, 1), "lora_unet_y": random_lora((8, 8), 2, None, 2)},
                 arch="other")
    b = lora_set({"lora_unet_x": random_lora((8, 8), 2, None, 3), "lora_unet_y": random_lora((8, 16), 2, None, 4)},
                 arch="other")
    with pytest.raises(ShapeMismatchError, match="module 'lora_unet_y' is 8x8 in input 1 but 8x16 in input 2"):
        merge_loras([a, b])


def test_argument_errors():
    a = lora_set({NAMES[0]: random_lora(shape_of(NAMES[0]), 4, None, 1)})
    with pytest.raises(MergeCoreError, match=r"number of weights \(1\) must match number of inputs \(2\)"):
        merge_loras([a, a], weights=[1.0])
    with pytest.raises(MergeCoreError, match="unknown merge method 'avg'"):
        merge_loras([a, a], "avg")
    with pytest.raises(MergeCoreError, match="unknown solver"):
        merge_loras([a, a], solver="magic")
    with pytest.raises(MergeCoreError, match="unknown dora policy"):
        merge_loras([a, a], dora="maybe")


def test_progress_after_every_module_and_cancel():
    s = lora_set({n: random_lora(shape_of(n), 4, None, seed=i) for i, n in enumerate(NAMES)})
    seen = []
    merge_loras([s, s], progress=lambda done, total, name: seen.append((done, total, name)), device="cpu")
    assert [d for d, _, _ in seen] == [1, 2, 3, 4] and {t for _, t, _ in seen} == {4}
    assert sorted(n for _, _, n in seen) == sorted(NAMES)

    def cancel(done, total, name):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        merge_loras([s, s], progress=cancel, device="cpu")


def test_worker_threads_give_the_same_result_and_can_be_cancelled():
    """With torch at 2 threads on the CPU, batches run on two worker threads: identical output, progress in
    this thread, a raising progress stops the merge, and torch's thread count is restored."""
    sets = [lora_set({n: random_lora(shape_of(n), 4, None, seed=9 * j + i) for i, n in enumerate(NAMES + [CONV])})
            for j in range(2)]
    serial = merge_loras(sets, "rsvd", device="cpu")
    torch.set_num_threads(2)
    try:
        threaded = merge_loras(sets, "rsvd", device="cpu")
        assert torch.get_num_threads() == 2
        seen = []

        def cancel(done, total, name):
            seen.append(done)
            raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            merge_loras(sets, "ties", device="cpu", progress=cancel)
        assert seen == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)
    for n in NAMES + [CONV]:
        assert torch.equal(serial.modules[n].up, threaded.modules[n].up)
        assert torch.equal(serial.modules[n].down, threaded.modules[n].down)


def test_heap_trimmer_runs_when_the_heap_grew():
    from merge_core.merge.heap import HeapTrimmer, resident_bytes

    trim = HeapTrimmer(step=0)
    held = [torch.ones(256, 1024) for _ in range(8)]  # 8 MiB live
    trim()  # hands free pages back; must not disturb live tensors
    assert all(float(t.sum()) == 256 * 1024 for t in held)
    assert resident_bytes() > 0


@pytest.mark.parametrize("config, needle", [
    ([1, 2], "must be a JSON object, got list"),
    ({"peft_type": "LORA", "r": 0, "lora_alpha": 8}, "r must be a whole number >= 1, got 0"),
    ({"peft_type": "LORA", "r": "four", "lora_alpha": 8}, "r must be a number, got 'four'"),
    ({"peft_type": "LORA", "r": 8, "lora_alpha": 8, "alpha_pattern": {"q_proj": "x"}},
     "alpha_pattern['q_proj'] must be a number, got 'x'"),
    ({"peft_type": "LORA", "r": 8, "lora_alpha": 8, "rank_pattern": {"(": 4}},
     "rank_pattern pattern '(' is not a regular expression"),
])
def test_a_malformed_adapter_config_is_one_clear_error(tmp_path, config, needle):
    peft_dora_folder(tmp_path / "a", 1)
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(MergeCoreError, match=r"adapter_config\.json in .*: " + needle.replace("[", r"\[").replace(
            "(", r"\(").replace(")", r"\)")):
        load_lora(tmp_path / "a")


def test_inputs_that_share_no_module_are_merged_with_a_warning(tmp_path, caplog):
    """Nothing to merge with anything: a warning naming an example per input, and for a non-SDXL model named
    in two styles (kohya and PEFT/diffusers, which only the SDXL and Flux tables match; here Wan's diffusers
    names) the styles; shared modules: none."""
    kohya = {"lora_unet_blocks_0_self_attn_q.lora_down.weight": torch.randn(4, 64),
             "lora_unet_blocks_0_self_attn_q.lora_up.weight": torch.randn(64, 4)}
    diffusers = {"transformer.blocks.0.attn1.to_q.lora_A.weight": torch.randn(4, 64),
                 "transformer.blocks.0.attn1.to_q.lora_B.weight": torch.randn(64, 4)}
    save_file(kohya, str(tmp_path / "k.safetensors"))
    save_file(diffusers, str(tmp_path / "d.safetensors"))
    sets = [load_lora(tmp_path / "k.safetensors"), load_lora(tmp_path / "d.safetensors")]
    with caplog.at_level("WARNING"):
        result = merge_loras(sets, "concat")
    assert len(result.modules) == 2
    assert [r.getMessage() for r in caplog.records] == [
        "no module is in more than one input (they name modules in different styles: kohya and peft; only SDXL, "
        "Flux, SD3 and Z-Image names, and paths as the model names them, are matched across styles): the result "
        "holds each input's modules side by side, merged with "
        f"nothing (e.g. 'lora_unet_blocks_0_self_attn_q' in {tmp_path / 'k.safetensors'}, "
        f"'transformer.blocks.0.attn1.to_q' in {tmp_path / 'd.safetensors'})"]

    caplog.clear()
    te, unet = lora_set({NAMES[3]: random_lora(shape_of(NAMES[3]), 2, 1.0, 1)}), \
        lora_set({NAMES[0]: random_lora(shape_of(NAMES[0]), 2, 1.0, 2)})
    with caplog.at_level("WARNING"):
        merge_loras([te, unet], "concat")
        assert len(caplog.records) == 1 and "different styles" not in caplog.records[0].getMessage()
        caplog.clear()
        merge_loras([te, unet, lora_set({NAMES[0]: random_lora(shape_of(NAMES[0]), 2, 1.0, 3)})], "concat")
    assert caplog.records == []  # NAMES[0] is shared by two inputs
