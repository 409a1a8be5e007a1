"""The pack in a real, headless ComfyUI 0.3.75 server: it loads, /object_info describes every node, API
workflows (load → merge/fuse/extract → save, bake) succeed and write the expected files (read back with
merge_core and safetensors, checked against dense references written here), bad inputs fail with the pack's
message and write nothing, and every example workflow parses and runs where its inputs can be made."""
from __future__ import annotations

import json
import urllib.parse
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from comfy_host import ComfyServer, ComfyServerError
from comfy_host.runner import PACK_NAME, REPO_ROOT
from merge_core.files.metadata import RECIPE_KEY
from merge_core.lora_file import load_lora
from nodes_support import (CONV_NAME, MODULE_NAMES, VAE_KEY, checkpoint_key, checkpoint_pair, dense_delta,
                           loha_tensors, lokr_tensors, lora_tensors, rel_err, specs, write)
from tools.comfy_workflow import ordered_inputs, ui_to_api

pytestmark = pytest.mark.comfyui

SPECS = specs(MODULE_NAMES + (CONV_NAME,))
LINEAR = specs(MODULE_NAMES)
CKPT_SPECS = [s for s in SPECS if s.group in ("unet", "te1")]
EXAMPLES = sorted((REPO_ROOT / "example_workflows").glob("*.json"))
NOT_RUNNABLE = {"preview_merged_lora_txt2img": "needs a real SDXL checkpoint and a sampler run"}

SLOTS = [f"{kind}_{i}" for i in range(3, 9) for kind in ("lora", "weight")]
RANK_RULE = ["rank", "energy", "min_rank", "max_rank"]
EXPECTED = {  # node id: (required inputs, optional inputs, output types, output node)
    "LoRArSVD_Load": (["lora_name", "profile"], [], ["RSVD_LORA", "STRING"], False),
    "LoRArSVD_Apply": (["model", "clip", "lora", "strength_model", "strength_clip"], [], ["MODEL", "CLIP"], False),
    "LoRArSVD_Merge": (["lora_1", "weight_1", "lora_2", "weight_2", *RANK_RULE, "seed", "device", "dora"],
                       [*SLOTS, "target_size_mb", "block_weights"], ["RSVD_LORA"], False),
    "LoRArSVD_MergeConventional": (["lora_1", "weight_1", "lora_2", "weight_2", "method", "density", *RANK_RULE,
                                    "seed", "device", "dora", "block_weights"], [*SLOTS, "target_size_mb"],
                                   ["RSVD_LORA"], False),
    "LoRArSVD_Resize": (["lora", "method", *RANK_RULE, "seed", "device", "dora"], ["target_size_mb", "block_weights"],
                        ["RSVD_LORA"], False),
    "LoRArSVD_RankTable": (["lora", "device"], [], ["STRING"], True),
    "LoRArSVD_Fuse": (["lora_1", "weight_1", "lora_2", "weight_2", "strategy", "norm_threshold", "output_format",
                       *RANK_RULE, "device", "dora"], SLOTS, ["RSVD_LORA"], False),
    "LoRArSVD_ExtractModels": (["base_model", "tuned_model", *RANK_RULE, "conv_rank", "diff_only", "min_diff",
                                "device", "seed"], ["base_clip", "tuned_clip", "target_size_mb"], ["RSVD_LORA"], False),
    "LoRArSVD_ExtractCheckpoints": (["base_ckpt", "tuned_ckpt", "text_encoders", *RANK_RULE, "conv_rank",
                                     "diff_only", "min_diff", "device", "seed"], ["target_size_mb"], ["RSVD_LORA"],
                                    False),
    "LoRArSVD_Bake": (["ckpt_name", "strength", "filename_prefix", "output_dtype", "device"], ["lora", "lora_name"],
                      ["STRING"], True),
    "LoRArSVD_Save": (["lora", "filename_prefix", "dtype"], ["title"], ["STRING"], True),
    "LoRArSVD_Report": (["lora"], [], ["STRING", "IMAGE"], False),
    "LoRArSVD_ToLoraModel": (["lora"], [], ["LORA_MODEL", "STRING"], False),
    "LoRArSVD_FromLoraModel": (["lora_model"], [], ["RSVD_LORA", "STRING"], False),
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The synthetic inputs, by name (kohya SDXL names, real shapes; the example workflows' file names)."""
    root = tmp_path_factory.mktemp("nodes_server")
    loras, ckpts = root / "loras", root / "checkpoints"
    t = {
        "sdxl_style_a.safetensors": lora_tensors(SPECS, rank=4, seed=1),
        "sdxl_style_b.safetensors": lora_tensors(SPECS, rank=4, seed=2, alpha=4.0),
        "sdxl_style_c.safetensors": lora_tensors(LINEAR[:3], rank=2, seed=3),
        "sdxl_lokr_a.safetensors": lokr_tensors(LINEAR, seed=4),
        "sdxl_lokr_b.safetensors": lokr_tensors(LINEAR, seed=7, rank=3),
        "sdxl_loha.safetensors": loha_tensors(LINEAR, rank=2, seed=5),
        "sd15_style.safetensors": {  # SD1.5: cross-attention reads a 768-wide context
            "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k.lora_up.weight": torch.randn(320, 4),
            "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k.lora_down.weight": torch.randn(4, 768)},
    }
    for name, tensors in t.items():
        write(loras / name, tensors)
    good = (loras / "sdxl_style_a.safetensors").read_bytes()
    (loras / "corrupt.safetensors").write_bytes(good[: len(good) // 2])
    base, tuned = checkpoint_pair(CKPT_SPECS, rank=4, seed=6)
    write(ckpts / "sdxl_base.safetensors", base)
    write(ckpts / "sdxl_finetuned.safetensors", tuned)
    write(ckpts / "sd15_base.safetensors", {
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.randn(320, 768)})
    return {"root": root, "loras": loras, "checkpoints": ckpts, "tensors": t, "base": base, "tuned": tuned}


@pytest.fixture(scope="module")
def server(files):
    with ComfyServer(loras_dir=files["loras"], checkpoints_dir=files["checkpoints"],
                     workdir=files["root"] / "work") as srv:
        yield srv


def output_files(srv) -> set[str]:
    return {p.relative_to(srv.output_dir).as_posix() for p in srv.output_dir.rglob("*") if p.is_file()}


def load_node(name: str) -> dict:
    return {"class_type": "LoRArSVD_Load", "inputs": {"lora_name": name, "profile": "auto"}}


def save_node(source: str, prefix: str, dtype: str = "fp32") -> dict:
    return {"class_type": "LoRArSVD_Save", "inputs": {"lora": [source, 0], "filename_prefix": prefix,
                                                      "dtype": dtype}}


def rule(rank: int = 0, energy: float = 0.99, min_rank: int = 4, max_rank: int = 32) -> dict:
    return {"rank": rank, "energy": energy, "min_rank": min_rank, "max_rank": max_rank}


def saved_path(srv, entry: dict, node_id: str) -> Path:
    return srv.output_dir / entry["outputs"][node_id]["text"][0]


def recipe_of(path: Path) -> dict:
    with safe_open(str(path), "pt") as fh:
        return json.loads(fh.metadata()[RECIPE_KEY])


def run_failing(srv, prompt: dict) -> dict:
    """Run a prompt that must fail during execution; returns its execution_error payload."""
    before = output_files(srv)
    entry = srv.run(prompt, check=False)
    assert entry["status"]["status_str"] == "error"
    errors = srv.error_messages(entry)
    assert len(errors) == 1
    assert output_files(srv) == before  # nothing written, not even a temp file
    return errors[0]


def test_pack_loads_and_describes_every_node(server):
    assert not server.import_failed(), "\n".join(server.pack_import_lines()) + server.log_tail()
    assert server.pack_loaded()
    info = server.object_info()
    for node_id, (required, optional, outputs, output_node) in EXPECTED.items():
        d = info[node_id]
        assert d["category"] == "LoRA rSVD Merge"
        assert d["python_module"] == f"custom_nodes.{PACK_NAME}"
        assert d["display_name"] != node_id and d["description"]
        assert d["input_order"]["required"] == required, node_id
        assert d["input_order"].get("optional", []) == optional, node_id
        assert d["output"] == outputs and d["output_node"] == output_node, node_id
    assert "sdxl_style_a.safetensors" in info["LoRArSVD_Load"]["input"]["required"]["lora_name"][0]
    assert info["LoRArSVD_Merge"]["input"]["required"]["device"][0] == ["default", "cpu"]
    assert info["LoRArSVD_Merge"]["input"]["required"]["seed"][1]["control_after_generate"] is False


def test_node_docs_and_templates_are_served(server):
    for node_id in EXPECTED:
        text = server.request("GET", f"/extensions/{PACK_NAME}/docs/{node_id}.md")
        assert isinstance(text, str) and text.startswith("# "), node_id
    listed = server.get_json("/api/workflow_templates")
    assert sorted(listed[PACK_NAME]) == sorted(p.stem for p in EXAMPLES)
    name = urllib.parse.quote(EXAMPLES[0].name)
    assert server.get_json(f"/api/workflow_templates/{PACK_NAME}/{name}") == json.loads(EXAMPLES[0].read_text())


def test_rsvd_merge_and_save(server, files):
    prompt = {"1": load_node("sdxl_style_a.safetensors"), "2": load_node("sdxl_style_b.safetensors"),
              "3": load_node("sdxl_style_c.safetensors"),
              "4": {"class_type": "LoRArSVD_Merge", "inputs": {
                  "lora_1": ["1", 0], "weight_1": 0.8, "lora_2": ["2", 0], "weight_2": -0.5, "lora_3": ["3", 0],
                  "weight_3": 1.5, **rule(rank=10), "seed": 7, "device": "default", "dora": "error"}},
              "5": save_node("4", "loras/rsvd_test"),
              "6": {"class_type": "LoRArSVD_Report", "inputs": {"lora": ["4", 0]}},
              "7": {"class_type": "PreviewImage", "inputs": {"images": ["6", 1]}}}
    entry = server.run(prompt, timeout=180)
    path = saved_path(server, entry, "5")
    assert path.name == "rsvd_test_00001_.safetensors" and path.parent == server.output_dir / "loras"
    assert entry["outputs"]["7"]["images"]
    saved = load_file(str(path))
    t = files["tensors"]
    c_names = {s.name for s in LINEAR[:3]}
    for s in SPECS:  # rank 10 ≥ 4 + 4 + 2: the merge is exact
        expected = (0.8 * dense_delta(t["sdxl_style_a.safetensors"], s.name, s.shape)
                    - 0.5 * dense_delta(t["sdxl_style_b.safetensors"], s.name, s.shape))
        if s.name in c_names:
            expected += 1.5 * dense_delta(t["sdxl_style_c.safetensors"], s.name, s.shape)
        assert rel_err(dense_delta(saved, s.name, s.shape), expected) < 1e-4, s.name
    recipe = recipe_of(path)
    assert recipe["operation"] == "merge"
    assert [i["name"] for i in recipe["inputs"]] == ["sdxl_style_a.safetensors", "sdxl_style_b.safetensors",
                                                    "sdxl_style_c.safetensors"]
    assert load_lora(path).arch == "sdxl"
    lora_list = server.object_info("LoraLoader")["LoraLoader"]["input"]["required"]["lora_name"][0]
    assert "rsvd_test_00001_.safetensors" in lora_list  # output/loras is a loras folder


def test_conventional_merges(server, files):
    """The exact ones checked against T; TIES, DARE and the rest run in the side-by-side example workflow."""
    prompt = {"1": load_node("sdxl_style_a.safetensors"), "2": load_node("sdxl_style_b.safetensors")}
    methods = ("concat", "svd", "weighted_avg", "geometric_mean")
    for k, method in enumerate(methods):
        prompt[str(10 + k)] = {"class_type": "LoRArSVD_MergeConventional", "inputs": {
            "lora_1": ["1", 0], "weight_1": 0.8, "lora_2": ["2", 0], "weight_2": 0.6, "method": method,
            "density": 0.5, **rule(rank=8), "seed": 0, "device": "cpu", "dora": "error", "block_weights": ""}}
        prompt[str(20 + k)] = save_node(str(10 + k), f"loras/conv_{method}")
    entry = server.run(prompt, timeout=300)
    t = files["tensors"]
    for k, method in enumerate(methods):
        path = saved_path(server, entry, str(20 + k))
        assert path.is_file() and recipe_of(path)["parameters"]
        if method in ("concat", "svd", "weighted_avg"):  # exact at rank 8 = 4 + 4
            saved = load_file(str(path))
            for s in SPECS:
                expected = (0.8 * dense_delta(t["sdxl_style_a.safetensors"], s.name, s.shape)
                            + 0.6 * dense_delta(t["sdxl_style_b.safetensors"], s.name, s.shape))
                assert rel_err(dense_delta(saved, s.name, s.shape), expected) < 1e-4, (method, s.name)


@pytest.mark.parametrize("node_id,extra", [
    ("LoRArSVD_MergeConventional", {"method": "concat", "density": 0.5}),
    ("LoRArSVD_Merge", {}),
])
def test_merge_with_block_weights(server, files, node_id, extra):
    """20-value weights on lora_1 only (IN08 off, OUT00 at 0.5); an empty line 2 leaves lora_2 whole.  concat,
    and rsvd at rank 8 = 4 + 4, keep all of T: exact."""
    blocks = ["BASE", *(f"IN{i:02d}" for i in range(9)), "MID", *(f"OUT{i:02d}" for i in range(9))]
    line = ",".join({"IN08": "0", "OUT00": "0.5"}.get(b, "1") for b in blocks)
    prompt = {"1": load_node("sdxl_style_a.safetensors"), "2": load_node("sdxl_style_b.safetensors"),
              "3": {"class_type": node_id, "inputs": {
                  "lora_1": ["1", 0], "weight_1": 1.0, "lora_2": ["2", 0], "weight_2": 0.5, **extra, **rule(rank=8),
                  "seed": 0, "device": "cpu", "dora": "error", "block_weights": f"{line}\n"}},
              "4": save_node("3", f"loras/blocks_{node_id}")}
    saved = load_file(str(saved_path(server, server.run(prompt, timeout=120), "4")))
    t = files["tensors"]
    for s in SPECS:
        a = dense_delta(t["sdxl_style_a.safetensors"], s.name, s.shape)
        b = dense_delta(t["sdxl_style_b.safetensors"], s.name, s.shape)
        scale = {"IN08": 0.0, "OUT00": 0.5}.get(s.block, 1.0)
        assert rel_err(dense_delta(saved, s.name, s.shape), scale * a + 0.5 * b) < 1e-4, s.name


def test_lycoris_fuse_and_save(server, files):
    prompt = {"1": load_node("sdxl_lokr_a.safetensors"), "2": load_node("sdxl_loha.safetensors"),
              "3": {"class_type": "LoRArSVD_Fuse", "inputs": {
                  "lora_1": ["1", 0], "weight_1": 0.5, "lora_2": ["2", 0], "weight_2": 0.7,
                  "strategy": "weighted_sum", "norm_threshold": 1.0, "output_format": "full", **rule(),
                  "device": "cpu", "dora": "error"}},
              "4": save_node("3", "loras/fused")}
    saved = load_file(str(saved_path(server, server.run(prompt, timeout=180), "4")))
    t = files["tensors"]
    for s in LINEAR:
        expected = (0.5 * dense_delta(t["sdxl_lokr_a.safetensors"], s.name, s.shape)
                    + 0.7 * dense_delta(t["sdxl_loha.safetensors"], s.name, s.shape))
        assert rel_err(dense_delta(saved, s.name, s.shape), expected) < 1e-5, s.name


def test_resize_a_lokr_to_a_lora(server, files):
    """LoKr (Kronecker rank 8·3 = 24) resized to a rank-4 LoRA: each module is the optimal truncation of its ΔW."""
    prompt = {"1": load_node("sdxl_lokr_b.safetensors"),
              "2": {"class_type": "LoRArSVD_Resize", "inputs": {
                  "lora": ["1", 0], "method": "svd", **rule(rank=4), "seed": 0, "device": "cpu", "dora": "error"}},
              "3": save_node("2", "loras/resized_lokr")}
    path = saved_path(server, server.run(prompt, timeout=120), "3")
    assert recipe_of(path)["operation"] == "merge"
    saved = load_file(str(path))
    t = files["tensors"]["sdxl_lokr_b.safetensors"]
    for s in LINEAR:
        T = dense_delta(t, s.name, s.shape).double()
        U, S, Vh = torch.linalg.svd(T, full_matrices=False)
        assert saved[f"{s.name}.lora_down.weight"].shape[0] == 4
        assert rel_err(dense_delta(saved, s.name, s.shape), U[:, :4] * S[:4] @ Vh[:4]) < 1e-5, s.name


def test_rank_table_shows_what_each_resize_keeps(server, files):
    """The table over the HTTP API; its numbers are inspect --ranks' (checked against dense SVDs in the unit
    tests): here, one row per energy level and fixed rank, energies rising, and the full rank keeping all."""
    prompt = {"1": load_node("sdxl_style_a.safetensors"),
              "2": {"class_type": "LoRArSVD_RankTable", "inputs": {"lora": ["1", 0], "device": "cpu"}}}
    text = server.run(prompt, timeout=120)["outputs"]["2"]["text"][0]
    lines = text.splitlines()
    assert lines[0] == "sdxl_style_a.safetensors: what a resize would keep" and lines[1].startswith("choice")
    rows = {line.split()[0] + " " + line.split()[1]: line for line in lines[2:]}
    assert list(rows) == ["energy 0.5", "energy 0.8", "energy 0.9", "energy 0.95", "energy 0.99", "energy 0.999",
                          "rank 4"]
    kept = [float(line.split("%")[0].split()[-1]) for line in rows.values()]
    assert kept[:6] == sorted(kept[:6]) and kept[-1] == 100.0  # rank 4 = the files' rank: everything


def test_extract_from_two_checkpoint_files(server, files):
    prompt = {"1": {"class_type": "LoRArSVD_ExtractCheckpoints", "inputs": {
        "base_ckpt": "sdxl_base.safetensors", "tuned_ckpt": "sdxl_finetuned.safetensors", "text_encoders": True,
        **rule(rank=4), "conv_rank": 0, "diff_only": False, "min_diff": 0.0, "device": "cpu", "seed": 0}},
        "2": save_node("1", "loras/extracted_test")}
    path = saved_path(server, server.run(prompt, timeout=180), "2")
    lset = load_lora(path)
    assert lset.arch == "sdxl" and set(lset.modules) == {s.name for s in CKPT_SPECS}
    saved = load_file(str(path))
    for s in CKPT_SPECS:
        key = checkpoint_key(s)
        assert rel_err(dense_delta(saved, s.name, s.shape), files["tuned"][key] - files["base"][key]) < 1e-4


def test_bake_lora_file_into_checkpoint(server, files):
    prompt = {"1": {"class_type": "LoRArSVD_Bake", "inputs": {
        "ckpt_name": "sdxl_base.safetensors", "strength": 0.75, "filename_prefix": "checkpoints/baked_test",
        "output_dtype": "same", "device": "default", "lora_name": "sdxl_style_a.safetensors"}}}
    entry = server.run(prompt, timeout=180)
    path = saved_path(server, entry, "1")
    assert path.parent == server.output_dir / "checkpoints" and path.name == "baked_test_00001_.safetensors"
    baked = load_file(str(path))
    base, lora = files["base"], files["tensors"]["sdxl_style_a.safetensors"]
    assert set(baked) == set(base)
    for s in CKPT_SPECS:
        key = checkpoint_key(s)
        expected = base[key] + 0.75 * dense_delta(lora, s.name, s.shape)
        assert rel_err(baked[key] - base[key], expected - base[key]) < 1e-5, s.name
    assert torch.equal(baked[VAE_KEY], base[VAE_KEY])
    assert recipe_of(path)["operation"] == "bake"
    ckpts = server.object_info("CheckpointLoaderSimple")["CheckpointLoaderSimple"]["input"]["required"]
    assert "baked_test_00001_.safetensors" in ckpts["ckpt_name"][0]  # output/checkpoints is a checkpoints folder


def test_missing_file_is_refused_before_running(server):
    before = output_files(server)
    with pytest.raises(ComfyServerError, match="lora_name"):
        server.submit({"1": load_node("no_such_lora.safetensors"), "2": save_node("1", "loras/never")})
    assert output_files(server) == before


def test_corrupt_file_fails_with_the_packs_message(server):
    err = run_failing(server, {"1": load_node("corrupt.safetensors"), "2": save_node("1", "loras/never")})
    assert err["exception_type"] == "merge_core.errors.InputFileError"
    assert "corrupt.safetensors" in err["exception_message"] and "truncated" in err["exception_message"]


def test_mismatched_architectures_fail_with_the_packs_message(server):
    err = run_failing(server, {
        "1": load_node("sdxl_style_a.safetensors"), "2": load_node("sd15_style.safetensors"),
        "3": {"class_type": "LoRArSVD_Merge", "inputs": {
            "lora_1": ["1", 0], "weight_1": 1.0, "lora_2": ["2", 0], "weight_2": 1.0, **rule(), "seed": 0,
            "device": "cpu", "dora": "error"}},
        "4": save_node("3", "loras/never")})
    assert err["exception_type"].startswith("merge_core.errors.")
    assert "sdxl" in err["exception_message"] and "sd15" in err["exception_message"]
    err = run_failing(server, {"1": {"class_type": "LoRArSVD_ExtractCheckpoints", "inputs": {
        "base_ckpt": "sdxl_base.safetensors", "tuned_ckpt": "sd15_base.safetensors", "text_encoders": True,
        **rule(rank=4), "conv_rank": 0, "diff_only": False, "min_diff": 0.0, "device": "cpu", "seed": 0}},
        "2": save_node("1", "loras/never")})
    assert err["exception_type"].startswith("merge_core.errors.") and "nothing to extract" in err["exception_message"]


def test_unsafe_prefix_and_bad_bake_inputs_fail_cleanly(server):
    err = run_failing(server, {"1": load_node("sdxl_style_a.safetensors"), "2": save_node("1", "../escaped")})
    assert err["exception_type"] == "merge_core.errors.UnsafePathError"
    assert not (server.workdir / "escaped_00001_.safetensors").exists()
    err = run_failing(server, {"1": {"class_type": "LoRArSVD_Bake", "inputs": {
        "ckpt_name": "sdxl_base.safetensors", "strength": 1.0, "filename_prefix": "checkpoints/never",
        "output_dtype": "same", "device": "cpu", "lora_name": "none"}}})
    assert "bake needs one LoRA" in err["exception_message"]


def _static_check(prompt: dict, info: dict) -> None:
    """Every node known, every required input given, every link from an output of the right type."""
    for node_id, n in prompt.items():
        d = info[n["class_type"]]
        for name, kind, _ in ordered_inputs(d):
            value = n["inputs"].get(name)
            if name in d["input"]["required"]:
                assert value is not None, (node_id, name)
            if isinstance(value, list):
                source = info[prompt[value[0]]["class_type"]]
                assert source["output"][value[1]] == kind, (node_id, name)


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_workflow(server, path):
    ui = json.loads(path.read_text(encoding="utf-8"))
    assert ui["version"] == 0.4 and ui["nodes"] and isinstance(ui["links"], list)
    info = server.object_info()
    prompt = ui_to_api(ui, info)
    _static_check(prompt, info)
    if path.stem in NOT_RUNNABLE:
        pytest.skip(NOT_RUNNABLE[path.stem])
    before = output_files(server)
    entry = server.run(prompt, timeout=300)
    new = output_files(server) - before
    saves = [i for i, n in prompt.items() if n["class_type"] in ("LoRArSVD_Save", "LoRArSVD_Bake")]
    written = {entry["outputs"][i]["text"][0] for i in saves}
    assert written and written <= new
    for rel in written:
        if rel.startswith("loras/"):
            assert load_lora(server.output_dir / rel).modules
