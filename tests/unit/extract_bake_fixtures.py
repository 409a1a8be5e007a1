"""Synthetic model pairs for the extract / bake tests: real SDXL key names and shapes for a subset of layers
(names from merge_core's SDXL table plus hand-written OpenCLIP-G keys), fine-tune deltas with decaying spectra."""
from __future__ import annotations

import torch

UNET = "model.diffusion_model."
TE1 = "conditioner.embedders.0.transformer.text_model."
TE2 = "conditioner.embedders.1.model."

# kohya name -> checkpoint key, for the linear/conv layers of the synthetic SDXL pair (real shapes)
LAYERS = {
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q":
        (UNET + "input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight", (640, 640)),
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k":
        (UNET + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight", (640, 2048)),
    "lora_unet_input_blocks_4_1_transformer_blocks_0_ff_net_2":
        (UNET + "input_blocks.4.1.transformer_blocks.0.ff.net.2.weight", (640, 2560)),
    "lora_unet_input_blocks_1_0_in_layers_2": (UNET + "input_blocks.1.0.in_layers.2.weight", (320, 320, 3, 3)),
    "lora_te1_text_model_encoder_layers_0_self_attn_q_proj":
        (TE1 + "encoder.layers.0.self_attn.q_proj.weight", (768, 768)),
    "lora_te2_text_model_encoder_layers_0_self_attn_out_proj":
        (TE2 + "transformer.resblocks.0.attn.out_proj.weight", (1280, 1280)),
}
IN_PROJ = TE2 + "transformer.resblocks.0.attn.in_proj_weight"
IN_PROJ_BIAS = TE2 + "transformer.resblocks.0.attn.in_proj_bias"
QKV = ["lora_te2_text_model_encoder_layers_0_self_attn_q_proj", "lora_te2_text_model_encoder_layers_0_self_attn_k_proj",
       "lora_te2_text_model_encoder_layers_0_self_attn_v_proj"]
NORM = UNET + "input_blocks.4.1.norm.weight"  # 1-D weight -> .diff
BIAS = UNET + "input_blocks.4.1.transformer_blocks.0.ff.net.2.bias"  # -> .diff_b
UNCHANGED = UNET + "input_blocks.4.1.transformer_blocks.0.attn1.to_k.weight"
TINY = UNET + "input_blocks.4.1.transformer_blocks.0.attn1.to_v.weight"  # changed by 1e-5 at most


def decaying(out: int, n: int, gen: torch.Generator, tau: float, scale: float = 0.05, rank: int = 128
             ) -> torch.Tensor:
    """out×n matrix with singular values scale·exp(−i/tau) (i < rank), random singular vectors."""
    m = min(out, n, rank)
    U, _ = torch.linalg.qr(torch.randn(out, m, generator=gen))
    V, _ = torch.linalg.qr(torch.randn(n, m, generator=gen))
    s = scale * torch.exp(-torch.arange(m, dtype=torch.float32) / tau)
    return (U * s) @ V.T


def sdxl_pair(seed: int = 0, low_rank: int = 128) -> tuple[dict, dict]:
    """(base, tuned) state dicts in the original SDXL layout (fp32), deltas with decaying spectra of rank
    `low_rank` (small: a LoRA of that rank is exact)."""
    gen = torch.Generator().manual_seed(seed)
    base, tuned = {}, {}
    taus = iter([6.0, 9.0, 13.0, 17.0, 23.0, 31.0, 7.0, 11.0, 15.0])
    for key, shape in list(LAYERS.values()) + [(IN_PROJ, (3840, 1280))]:
        w = torch.randn(shape, generator=gen) * 0.02
        n = w[0].numel()
        if key == IN_PROJ:  # q, k and v blocks change differently
            d = torch.cat([decaying(1280, n, gen, next(taus), rank=low_rank) for _ in range(3)])
        else:
            d = decaying(shape[0], n, gen, next(taus), rank=low_rank).reshape(shape)
        base[key], tuned[key] = w, w + d
    for key, shape in ((IN_PROJ_BIAS, (3840,)), (NORM, (640,)), (BIAS, (640,))):
        w = torch.randn(shape, generator=gen)
        base[key], tuned[key] = w, w + 0.01 * torch.randn(shape, generator=gen)
    w = torch.randn(640, 640, generator=gen) * 0.02
    base[UNCHANGED], tuned[UNCHANGED] = w, w.clone()
    w = torch.randn(640, 640, generator=gen) * 0.02
    base[TINY], tuned[TINY] = w, w + 1e-5 * (2 * torch.rand(640, 640, generator=gen) - 1)
    return base, tuned


def dense_delta(base: dict, tuned: dict, name: str) -> torch.Tensor:
    """The ΔW a module should approximate, computed here from the state dicts (TE2 q/k/v by hand)."""
    if name in QKV:
        i = QKV.index(name)
        return (tuned[IN_PROJ] - base[IN_PROJ])[1280 * i:1280 * (i + 1)]
    key = LAYERS[name][0]
    return tuned[key] - base[key]


def singular_values(delta: torch.Tensor) -> torch.Tensor:
    """All singular values of ΔW as a matrix, descending: a full eigendecomposition of the smaller Gram
    matrix in fp64 (σᵢ² = λᵢ(ΔWΔWᵀ)); as exact as an SVD for these sums, and faster on a busy CPU."""
    m = delta.flatten(1).double()
    gram = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
    return torch.linalg.eigvalsh(gram).clamp_min(0).sqrt().flip(0)


def optimal_error(s: torch.Tensor, k: int) -> float:
    """‖ΔW − best rank-k‖_F / ‖ΔW‖_F from ΔW's singular values s."""
    return float(s[k:].pow(2).sum().sqrt() / s.pow(2).sum().sqrt())


def lora_delta(module) -> torch.Tensor:
    """(α/r)·up@down in the weight's shape, written out here (not via the module's own delta())."""
    up, down = module.up.double(), module.down.double()
    scale = module.alpha / down.shape[0]
    return (scale * up.flatten(1) @ down.flatten(1)).reshape(module.weight_shape)
