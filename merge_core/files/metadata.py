"""kohya/modelspec metadata for written LoRAs, and the JSON recipe that says how a file was made."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

from .digests import input_sha256

RECIPE_KEY = "lora_rsvd_merge.recipe"
DIGEST_PLACEHOLDER = "0" * 64  # a sha256's length, to size a header before the inputs' hashes are known
TAG_FREQUENCY, TRIGGER_PHRASE = "ss_tag_frequency", "modelspec.trigger_phrase"  # what a merge carries over
NETWORK_MODULE = {"lora": "networks.lora", "loha": "lycoris.kohya", "lokr": "lycoris.kohya", "full": "lycoris.kohya"}
BASE_MODEL = {"sdxl": "sdxl_base_v1-0", "sd15": "sd_v1"}
ARCHITECTURE = {"sdxl": "stable-diffusion-xl-v1-base", "sd15": "stable-diffusion-v1"}
# what the base model is, kept when every input says the same (written anew for the architectures above)
MODEL_KEYS = ("ss_base_model_version", "modelspec.architecture", "modelspec.implementation")


def pack_version() -> str:
    from .. import __version__

    return __version__


def make_recipe(operation: str, inputs: Iterable[Union[str, os.PathLike]], parameters: dict,
                digests: Optional[Sequence[Optional[str]]] = None) -> dict:
    """{operation, inputs [{name, sha256}], parameters, pack version, time}; `digests`: the inputs' sha256
    when the caller has them already (else they are computed here)."""
    entries = []
    for i, p in enumerate(inputs):
        p = Path(p)
        if digests is not None:
            digest = digests[i]
        else:
            digest = input_sha256(p) if p.exists() else None
        entries.append({"name": p.name, "sha256": digest})
    return {"operation": operation, "inputs": entries, "parameters": parameters,
            "pack": "lora-rsvd-merge", "version": pack_version(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def carried_metadata(inputs: Iterable[dict[str, str]]) -> dict[str, str]:
    """What a file made from `inputs` (their metadata) keeps of theirs: the trigger words and training tags UIs
    show, and which base model it is for.  ss_tag_frequency ({folder: {tag: count}}) summed over the inputs
    (one that is not valid JSON is left out); modelspec.trigger_phrase joined, each distinct phrase once; the
    MODEL_KEYS each when every input has it and all agree (e.g. a Flux LoRA's `flux1` and `flux-1-dev/lora`)."""
    tags: dict[str, dict[str, int]] = {}
    phrases: list[str] = []
    model: dict[str, set] = {key: set() for key in MODEL_KEYS}
    for meta in inputs:
        for key in MODEL_KEYS:
            model[key].add(meta.get(key))
        try:
            folders = json.loads(meta.get(TAG_FREQUENCY) or "{}")
            for folder, counts in folders.items():
                into = tags.setdefault(str(folder), {})
                for tag, n in counts.items():
                    into[str(tag)] = into.get(str(tag), 0) + int(n)
        except (ValueError, TypeError, AttributeError):
            pass
        phrase = (meta.get(TRIGGER_PHRASE) or "").strip()
        if phrase and phrase not in phrases:
            phrases.append(phrase)
    out = {key: values.pop() for key, values in model.items() if len(values) == 1 and None not in values}
    if tags:
        out[TAG_FREQUENCY] = json.dumps(tags, ensure_ascii=False)
    if phrases:
        out[TRIGGER_PHRASE] = ", ".join(phrases)
    return out


def lora_metadata(kinds: set[str], ranks: list[int], alphas: list[float], arch: str,
                  recipe: Optional[dict] = None, title: Optional[str] = None,
                  carried: Optional[dict[str, str]] = None) -> dict[str, str]:
    """ss_* and modelspec.* keys (all strings, as safetensors metadata must be); `carried`: the inputs' keys
    kept (carried_metadata), under the ones written here."""
    meta = dict(carried or {})
    kind = "lora" if kinds <= {"lora"} else sorted(kinds - {"full"} or {"full"})[0]
    meta["ss_network_module"] = NETWORK_MODULE.get(kind, "networks.lora")
    if kind in ("loha", "lokr"):
        meta["ss_network_args"] = json.dumps({"algo": kind})
    dims, alphs = sorted(set(ranks)), sorted(set(alphas))
    meta["ss_network_dim"] = str(dims[0]) if len(dims) == 1 else "Dynamic"
    meta["ss_network_alpha"] = (f"{alphs[0]:g}" if len(alphs) == 1 else "Dynamic") if alphs else "Dynamic"
    form = "lora" if kind == "lora" else "lycoris"
    if arch in BASE_MODEL:
        meta["ss_base_model_version"] = BASE_MODEL[arch]
        meta["modelspec.architecture"] = f"{ARCHITECTURE[arch]}/{form}"
        meta["modelspec.implementation"] = "https://github.com/Stability-AI/generative-models"
    elif "modelspec.architecture" in meta:  # the inputs' (carried): this file's form after the model's name
        meta["modelspec.architecture"] = f"{meta['modelspec.architecture'].split('/')[0]}/{form}"
    meta.setdefault("modelspec.implementation", "peft")
    meta["modelspec.sai_model_spec"] = "1.0.0"
    if title:
        meta["modelspec.title"] = title
    if recipe is not None:
        names = [i["name"] for i in recipe.get("inputs", [])]
        if names:
            meta["modelspec.merged_from"] = ", ".join(names)
        meta[RECIPE_KEY] = json.dumps(recipe, sort_keys=True)
    return meta
