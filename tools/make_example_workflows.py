"""Write example_workflows/*.json (UI format, listed by ComfyUI's template browser) from the graphs below.

Each example is an API-format graph (widget values left out take the node's default) plus a note; the UI
form is laid out automatically.  Node definitions come from the real ComfyUI (tests/comfy_host) and this
pack, imported in-process.  Run from the repo root after changing a node's inputs:

    python tools/make_example_workflows.py [--check]

--check: exit 1 when a file differs from what would be written (the files are not touched).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "example_workflows"
LORA_A, LORA_B = "sdxl_style_a.safetensors", "sdxl_style_b.safetensors"
LOKR_A, LOKR_B = "sdxl_lokr_a.safetensors", "sdxl_lokr_b.safetensors"
BASE_CKPT, TUNED_CKPT = "sdxl_base.safetensors", "sdxl_finetuned.safetensors"
TXT2IMG_CKPT = "sd_xl_base_1.0.safetensors"
CONVENTIONAL = ("concat", "svd", "weighted_avg", "ties", "dare", "dare_ties", "geometric_mean")


def load(node_id: str, name: str) -> dict:
    return {node_id: {"class_type": "LoRArSVD_Load", "inputs": {"lora_name": name, "profile": "auto"}}}


def report(node_id: str, source: str) -> dict:
    return {node_id: {"class_type": "LoRArSVD_Report", "inputs": {"lora": [source, 0]}},
            str(int(node_id) + 1): {"class_type": "PreviewImage", "inputs": {"images": [node_id, 1]}}}


def save(node_id: str, source: str, prefix: str) -> dict:
    return {node_id: {"class_type": "LoRArSVD_Save",
                      "inputs": {"lora": [source, 0], "filename_prefix": prefix, "dtype": "fp16", "title": ""}}}


def two_inputs(weight_1: float = 1.0, weight_2: float = 1.0) -> dict:
    return {"lora_1": ["1", 0], "weight_1": weight_1, "lora_2": ["2", 0], "weight_2": weight_2}


def rsvd_merge() -> dict:
    graph = {**load("1", LORA_A), **load("2", LORA_B),
             "3": {"class_type": "LoRArSVD_Merge", "inputs": {**two_inputs(0.8, 0.6), "rank": 0, "energy": 0.99,
                                                              "min_rank": 4, "max_rank": 64, "seed": 0}},
             **save("4", "3", "loras/rsvd_merge"), **report("5", "3")}
    return graph


def conventional() -> dict:
    graph = {**load("1", LORA_A), **load("2", LORA_B)}
    for k, method in enumerate(CONVENTIONAL):
        merge_id, save_id = str(10 + 2 * k), str(11 + 2 * k)
        graph[merge_id] = {"class_type": "LoRArSVD_MergeConventional",
                           "inputs": {**two_inputs(0.8, 0.6), "method": method, "density": 0.5, "rank": 0,
                                      "energy": 0.99, "min_rank": 4, "max_rank": 64, "seed": 0,
                                      "block_weights": ""}}
        graph.update(save(save_id, merge_id, f"loras/compare_{method}"))
    return graph


def lokr_fusion() -> dict:
    return {**load("1", LOKR_A), **load("2", LOKR_B),
            "3": {"class_type": "LoRArSVD_Fuse", "inputs": {**two_inputs(0.5, 0.5), "strategy": "smart_fusion",
                                                            "output_format": "auto"}},
            **save("4", "3", "loras/lycoris_fusion"), **report("5", "3")}


def resize() -> dict:
    return {**load("1", LOKR_B),
            "2": {"class_type": "LoRArSVD_Resize", "inputs": {"lora": ["1", 0], "method": "svd", "rank": 0,
                                                              "energy": 0.99, "min_rank": 4, "max_rank": 16}},
            **save("3", "2", "loras/resized"), **report("4", "2"),
            "6": {"class_type": "LoRArSVD_RankTable", "inputs": {"lora": ["1", 0]}}}


def extraction() -> dict:
    return {"1": {"class_type": "LoRArSVD_ExtractCheckpoints",
                  "inputs": {"base_ckpt": BASE_CKPT, "tuned_ckpt": TUNED_CKPT, "text_encoders": True,
                             "rank": 32}},
            **save("2", "1", "loras/extracted"), **report("3", "1")}


def bake() -> dict:
    return {**load("1", LORA_A),
            "2": {"class_type": "LoRArSVD_Bake", "inputs": {"ckpt_name": BASE_CKPT, "strength": 0.8,
                                                            "filename_prefix": "checkpoints/baked",
                                                            "lora": ["1", 0], "lora_name": "none"}}}


def txt2img_preview() -> dict:
    return {**load("1", LORA_A), **load("2", LORA_B),
            "3": {"class_type": "LoRArSVD_Merge", "inputs": {**two_inputs(0.8, 0.6), "max_rank": 64}},
            "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": TXT2IMG_CKPT}},
            "5": {"class_type": "LoRArSVD_Apply", "inputs": {"model": ["4", 0], "clip": ["4", 1], "lora": ["3", 0],
                                                             "strength_model": 1.0, "strength_clip": 1.0}},
            "6": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["5", 1],
                                                             "text": "a lighthouse on a cliff at dusk"}},
            "7": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["5", 1], "text": "blurry, watermark"}},
            "8": {"class_type": "EmptyLatentImage", "inputs": {"width": 1024, "height": 1024, "batch_size": 1}},
            "9": {"class_type": "KSampler", "inputs": {"model": ["5", 0], "positive": ["6", 0],
                                                       "negative": ["7", 0], "latent_image": ["8", 0], "seed": 42,
                                                       "steps": 25, "cfg": 7.0, "sampler_name": "euler",
                                                       "scheduler": "normal", "denoise": 1.0}},
            "10": {"class_type": "VAEDecode", "inputs": {"samples": ["9", 0], "vae": ["4", 2]}},
            "11": {"class_type": "SaveImage", "inputs": {"images": ["10", 0], "filename_prefix": "lora_preview"}}}


EXAMPLES = {
    "rsvd_merge_two_sdxl_loras": (rsvd_merge, (
        "## rSVD merge of two SDXL LoRAs\nT = 0.8·ΔW_A + 0.6·ΔW_B per module, stacked exactly, then a seeded "
        "randomized SVD keeps 99 % of ‖T‖² (ranks 4–64). **Save LoRA** writes `output/loras/rsvd_merge_00001_"
        ".safetensors` (LoraLoader lists it at once); **Merge Report** shows rank and kept energy per block.")),
    "conventional_methods_side_by_side": (conventional, (
        "## Conventional merges side by side\nThe same two LoRAs merged by concat (exact), SVD, weighted "
        "average, TIES, DARE and geometric mean, each saved as `loras/compare_<method>_…` to try in LoraLoader. "
        "Put SDXL block weights (20 or 12 values per line, one line per input) in `block_weights`.")),
    "lokr_fusion": (lokr_fusion, (
        "## LoKr fusion\nFuses two LoKr files on their exact deltas (smart_fusion), never by adding raw "
        "factors; `auto` writes LoKr (the nearest Kronecker product) where it keeps ≥ 99.9 % of the energy, "
        "else LoRA. LoHa, LoRA and full-diff inputs fuse too.")),
    "resize_lora": (resize, (
        "## Resize a LoRA\nRe-factors one LoRA (or a LoHa/LoKr, as here) as a plain LoRA: per module the exact "
        "truncated SVD of its ΔW, at the smallest rank keeping 99 % of ‖ΔW‖² (ranks 4–16). Set `rank` for one "
        "rank everywhere, or `target_size_mb` to fit a file size. **LoRA Rank Table** shows beforehand what each "
        "energy level or rank would keep and the file size; **Merge Report** what each module kept.")),
    "extract_lora_from_two_checkpoints": (extraction, (
        "## Extract a LoRA from two checkpoints\nStreams both files one tensor pair at a time (no model is "
        "loaded) and keeps rank 32 per layer (set rank 0 for the energy rule). Text encoders included.")),
    "bake_lora_into_checkpoint": (bake, (
        "## Bake a LoRA into a checkpoint\nWrites checkpoint + 0.8·ΔW to `output/checkpoints/baked_00001_"
        ".safetensors`, streamed, fp32 compute, every other tensor kept as it is. Or choose a file in "
        "`lora_name` instead of connecting a LoRA.")),
    "preview_merged_lora_txt2img": (txt2img_preview, (
        "## Preview a merge before saving it\nMerges two LoRAs and applies the result with **Apply LoRA** "
        "(ComfyUI's own LoRA patching, like LoraLoader) in a plain SDXL txt2img graph. Add **Save LoRA** when "
        "you like the picture.")),
}


def _import_pack():
    spec = importlib.util.spec_from_file_location("lora_rsvd_merge_examples", ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def object_info() -> dict:
    """Definitions of ComfyUI's core nodes and this pack's, as /object_info gives them."""
    sys.path.insert(0, str(ROOT / "tests"))
    from comfy_host import import_comfy

    import_comfy()
    import nodes as comfy_nodes  # ComfyUI's own nodes.py (its folder is first on sys.path now)

    from comfy_workflow import definition_of

    classes = {**comfy_nodes.NODE_CLASS_MAPPINGS, **_import_pack().NODE_CLASS_MAPPINGS}
    return {name: definition_of(cls) for name, cls in classes.items()}


def with_defaults(prompt: dict, info: dict) -> dict:
    """Every widget value present: those a graph leaves out take the input's default (or first choice)."""
    from comfy_workflow import is_widget, ordered_inputs

    out = {}
    for node_id, node in prompt.items():
        inputs = dict(node["inputs"])
        for name, kind, opts in ordered_inputs(info[node["class_type"]]):
            if name not in inputs and is_widget(kind, opts):
                inputs[name] = opts.get("default", kind[0] if isinstance(kind, list) and kind else None)
        out[node_id] = {"class_type": node["class_type"], "inputs": inputs}
    return out


def build(info: dict) -> dict[str, str]:
    from comfy_workflow import api_to_ui

    files = {}
    for name, (graph, note) in EXAMPLES.items():
        ui = api_to_ui(with_defaults(graph(), info), info, notes=[(note, (40, -240))])
        files[name + ".json"] = json.dumps(ui, indent=1, ensure_ascii=False) + "\n"
    return files


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare with the files on disk")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "tools"))
    files = build(object_info())
    stale = [n for n, text in files.items() if not (OUT / n).exists() or (OUT / n).read_text("utf-8") != text]
    if args.check:
        print("\n".join(f"stale: {n}" for n in stale) or "example workflows are up to date")
        return 1 if stale else 0
    OUT.mkdir(exist_ok=True)
    for name, text in files.items():
        (OUT / name).write_text(text, encoding="utf-8")
    print(f"wrote {len(files)} workflows to {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
