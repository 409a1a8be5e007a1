"""Merging straight into a .safetensors file (merge/to_file.py, what the CLI does): the streamed file holds
exactly what merge_loras + save would write, in the same order on every run however the worker threads
finish, with a valid header — PEFT folders too (embeddings, lora_bias, the config written last, a size budget);
other outputs (.pt) take the in-memory path; nothing is left behind on failure;
the recipe's sha256 are the files' own (hashed in the background from load time)."""
from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from merge_core.cli import main
from merge_core.errors import MergeCoreError
from merge_core.lora_file import load_lora
from merge_core.merge import merge_loras, merge_to_file, plan_merge
from merge_core.merge.scheduler import torch_threads
from merge_testlib import one_torch_thread  # noqa: F401  (autouse)
from merge_testlib import CONV, NAMES, gen, shape_of

BIAS = torch.arange(640.0) / 640


def lora_tensors(name: str, rank: int, seed: int) -> dict:
    shape = shape_of(name)
    kernel = tuple(shape[2:])
    return {f"{name}.lora_up.weight": torch.randn(shape[0], rank, *([1] * len(kernel)), generator=gen(seed)) * 0.1,
            f"{name}.lora_down.weight": torch.randn(rank, shape[1], *kernel, generator=gen(seed + 1)) * 0.1,
            f"{name}.alpha": torch.tensor(rank / 2)}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """a: NAMES[0..2] + a LoCon 3x3 conv, NAMES[0] with a bias delta; b: NAMES[0..1] (NAMES[0] with a bias
    delta) and only a bias delta for NAMES[3] (a module with nothing to factor)."""
    d = tmp_path_factory.mktemp("to_file")
    a = {k: v for i, n in enumerate(NAMES[:3] + [CONV]) for k, v in lora_tensors(n, 8, 10 * i).items()}
    b = {k: v for i, n in enumerate(NAMES[:2]) for k, v in lora_tensors(n, 4, 100 + 10 * i).items()}
    a[f"{NAMES[0]}.diff_b"], b[f"{NAMES[0]}.diff_b"] = BIAS, 2 * BIAS
    b[f"{NAMES[3]}.diff_b"] = torch.ones(shape_of(NAMES[3])[0])
    paths = d / "a.safetensors", d / "b.safetensors"
    for sd, p in zip((a, b), paths):
        save_file({k: v.half() if v.ndim else v for k, v in sd.items()}, str(p))
    return paths


def tensors_of(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def data_section(path: Path) -> bytes:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return raw[8 + n:]


@pytest.mark.parametrize("method", ["rsvd", "concat"])
def test_streamed_file_holds_what_the_in_memory_merge_writes(inputs, tmp_path, method):
    sets = [load_lora(p) for p in inputs]
    streamed = tmp_path / "streamed.safetensors"
    report = merge_to_file(plan_merge(sets, method), streamed, "fp16", device="cpu")
    held = merge_loras([load_lora(p) for p in inputs], method, device="cpu")
    saved = held.save(tmp_path / "saved.safetensors")
    a, b = tensors_of(streamed), tensors_of(saved)
    assert set(a) == set(b) and f"{NAMES[3]}.diff_b" in a and f"{CONV}.lora_up.weight" in a
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    assert torch.allclose(a[f"{NAMES[0]}.diff_b"].float(), 0.5 * 3 * BIAS if method == "rsvd" else 3 * BIAS,
                          rtol=2e-3, atol=1e-3)  # fp16 file
    assert [(m.name, m.rank, m.params) for m in report.modules] == \
        [(m.name, m.rank, m.params) for m in held.report.modules]
    with safe_open(str(streamed), "pt") as f:
        meta = f.metadata()
    with safe_open(str(saved), "pt") as f:
        expected = f.metadata()
    assert set(meta) == set(expected)
    assert json.loads(meta["lora_rsvd_merge.recipe"])["parameters"]["dtype"] == "fp16"
    assert meta["ss_network_dim"] == expected["ss_network_dim"]
    assert load_lora(streamed).modules[CONV].up.shape[2:] == (1, 1)


def test_streamed_layout_is_the_same_on_every_run_with_worker_threads(inputs, tmp_path):
    files = []
    with torch_threads(2):  # two worker threads: batches finish in any order
        for i in range(3):
            files.append(tmp_path / f"m{i}.safetensors")
            merge_to_file(plan_merge([load_lora(p) for p in inputs], "rsvd"), files[-1], device="cpu")
    assert data_section(files[0]) == data_section(files[1]) == data_section(files[2])


def test_recipe_hashes_come_from_the_background_digests(inputs, tmp_path):
    sets = [load_lora(p, digest=True) for p in inputs]
    assert [s.sha256() for s in sets] == [hashlib.sha256(p.read_bytes()).hexdigest() for p in inputs]
    out = tmp_path / "h.safetensors"
    merge_to_file(plan_merge(sets, "concat"), out, device="cpu")
    with safe_open(str(out), "pt") as f:
        recipe = json.loads(f.metadata()["lora_rsvd_merge.recipe"])
    assert [i["sha256"] for i in recipe["inputs"]] == [s.sha256() for s in sets]


def test_nothing_to_write_leaves_nothing_behind(tmp_path):
    src = tmp_path / "one.safetensors"
    save_file({k: v.half() if v.ndim else v for k, v in lora_tensors(NAMES[1], 4, 7).items()}, str(src))
    sets = [load_lora(src), load_lora(src)]
    out = tmp_path / "out" / "zero.safetensors"
    with pytest.raises(MergeCoreError, match="nothing to write"):
        merge_to_file(plan_merge(sets, "rsvd", weights=[1.0, -1.0]), out, device="cpu")
    assert list(out.parent.iterdir()) == []


def test_existing_output_is_refused_before_any_work(inputs, tmp_path):
    out = tmp_path / "x.safetensors"
    out.write_bytes(b"keep me")
    with pytest.raises(MergeCoreError, match="output exists"):
        merge_to_file(plan_merge([load_lora(p) for p in inputs], "rsvd"), out, device="cpu")
    assert out.read_bytes() == b"keep me"


def test_cli_pt_output_goes_through_the_in_memory_path(inputs, tmp_path, capsys):
    out = tmp_path / "m.pt"
    assert main(["merge", *map(str, inputs), "-o", str(out), "--threads", "1"]) == 0
    merged = load_lora(out)
    assert merged.modules[NAMES[0]].up.dtype == torch.float16 and merged.modules[NAMES[0]].alpha == \
        merged.modules[NAMES[0]].rank
    assert f"wrote {out} (5 modules, method rsvd)" in capsys.readouterr().out


def peft_adapter(folder: Path, seed: int, r: int) -> Path:
    """A PEFT folder: q/v LoRAs with lora_bias, and a LoRA on embed_tokens."""
    folder.mkdir()
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for p in ("q_proj", "v_proj"):
        n = f"base_model.model.model.layers.0.self_attn.{p}"
        sd.update({f"{n}.lora_A.weight": torch.randn(r, 32, generator=g),
                   f"{n}.lora_B.weight": torch.randn(48, r, generator=g), f"{n}.lora_B.bias": torch.randn(48, generator=g)})
    e = "base_model.model.model.embed_tokens"
    sd.update({f"{e}.lora_embedding_A": torch.randn(r, 100, generator=g),
               f"{e}.lora_embedding_B": torch.randn(32, r, generator=g)})
    save_file(sd, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": r, "lora_alpha": 2 * r,
                                                            "lora_bias": True, "base_model_name_or_path": "tiny",
                                                            "target_modules": ["q_proj", "v_proj", "embed_tokens"]}))
    return folder


@pytest.mark.parametrize("method", ["rsvd", "concat"])
def test_peft_folders_stream_what_the_in_memory_merge_writes(tmp_path, method):
    sets = [load_lora(peft_adapter(tmp_path / "a", 1, 4)), load_lora(peft_adapter(tmp_path / "b", 2, 8))]
    merge_to_file(plan_merge(sets, method), tmp_path / "streamed", "fp16")
    held = merge_loras(sets, method).save(tmp_path / "held")
    with safe_open(str(tmp_path / "streamed" / "adapter_model.safetensors"), "pt") as f, \
            safe_open(str(tmp_path / "held" / "adapter_model.safetensors"), "pt") as g:
        assert sorted(f.keys()) == sorted(g.keys())
        assert all(torch.equal(f.get_tensor(k), g.get_tensor(k)) for k in f.keys())
    config = json.loads((tmp_path / "streamed" / "adapter_config.json").read_text())
    assert config == json.loads((tmp_path / "held" / "adapter_config.json").read_text())
    assert config["lora_bias"] is True and config["base_model_name_or_path"] == "tiny"
    back = load_lora(tmp_path / "streamed")
    assert back.peft_embeddings == {"base_model.model.model.embed_tokens"}
    assert {n: m.rank for n, m in back.modules.items()} == {n: m.rank for n, m in load_lora(held).modules.items()}


def test_cli_sizes_a_peft_folder(tmp_path, capsys):
    a, b = peft_adapter(tmp_path / "a", 1, 8), peft_adapter(tmp_path / "b", 2, 8)
    assert main(["merge", str(a), str(b), "-o", str(tmp_path / "full"), "--min-rank", "1", "--max-rank", "16",
                 "--energy", "1.0", "--threads", "1"]) == 0
    target = int((tmp_path / "full" / "adapter_model.safetensors").stat().st_size * 0.7)
    assert main(["merge", str(a), str(b), "-o", str(tmp_path / "fit"), "--min-rank", "1", "--max-rank", "16",
                 "--target-size", str(target), "--threads", "1"]) == 0
    assert (tmp_path / "fit" / "adapter_model.safetensors").stat().st_size <= target
    assert "size budget" in capsys.readouterr().out
    assert load_lora(tmp_path / "fit").peft_embeddings == {"base_model.model.model.embed_tokens"}


def diffusers_lora(path: Path, seed: int, r: int) -> Path:
    """A diffusers-style LoRA file (PEFT names in one .safetensors, no adapter_config.json, no alpha)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for n in ("transformer.transformer_blocks.0.attn.to_q", "transformer.single_transformer_blocks.0.proj_out"):
        sd.update({f"{n}.lora_A.weight": torch.randn(r, 64, generator=g), f"{n}.lora_B.weight": torch.randn(96, r,
                                                                                                        generator=g)})
    save_file(sd, str(path))
    return path


def test_peft_named_files_merge_into_a_file_not_a_folder(tmp_path, capsys):
    """Only a PEFT *folder* input makes the output a folder: diffusers-style files give a .safetensors (appended to
    a bare name) or, for .pt, a pickle — each with the inputs' names, exact for concat."""
    a, b = diffusers_lora(tmp_path / "a.safetensors", 1, 4), diffusers_lora(tmp_path / "b.safetensors", 2, 2)
    assert main(["merge", str(a), str(b), "--method", "concat", "--dtype", "fp32", "-o", str(tmp_path / "m"),
                 "--threads", "1"]) == 0
    assert f"wrote {tmp_path / 'm.safetensors'} (2 modules" in capsys.readouterr().out
    assert (tmp_path / "m.safetensors").is_file() and not (tmp_path / "m").exists()
    assert main(["merge", str(a), str(b), "--method", "concat", "--dtype", "fp32", "-o", str(tmp_path / "m.pt"),
                 "--threads", "1"]) == 0
    assert (tmp_path / "m.pt").is_file()
    written = tensors_of(tmp_path / "m.safetensors")
    pickled = torch.load(tmp_path / "m.pt", weights_only=True)
    assert sorted(written) == sorted(pickled) == sorted(k for k in tensors_of(a))
    ins = tensors_of(a), tensors_of(b)
    for n in ("transformer.transformer_blocks.0.attn.to_q", "transformer.single_transformer_blocks.0.proj_out"):
        T = sum(t[f"{n}.lora_B.weight"] @ t[f"{n}.lora_A.weight"] for t in ins)  # no alpha: scale 1; weights 1.0
        for got in (written, pickled):
            assert torch.allclose(got[f"{n}.lora_B.weight"] @ got[f"{n}.lora_A.weight"], T, atol=1e-4)


def test_peft_folders_with_a_pt_output_write_a_pickle_file(tmp_path):
    a, b = peft_adapter(tmp_path / "a", 1, 4), peft_adapter(tmp_path / "b", 2, 4)
    assert main(["merge", str(a), str(b), "-o", str(tmp_path / "m.pt"), "--threads", "1"]) == 0
    assert (tmp_path / "m.pt").is_file()  # was a folder named m.pt
    back = load_lora(tmp_path / "m.pt")
    assert back.profile == "peft" and set(back.modules) == set(load_lora(a).modules)
