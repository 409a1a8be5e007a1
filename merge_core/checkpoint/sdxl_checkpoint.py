"""Every tensor of an original-layout SDXL base checkpoint (UNet, CLIP-L, OpenCLIP-G; the VAE left out):
key -> (shape, dtype), from the architecture.  Used to build synthetic checkpoints for tests and benchmarks
(checked against ComfyUI's own SDXL model in tests/integration/test_extract_comfy.py).

UNet: model_channels 320, channel_mult (1, 2, 4), 2 ResBlocks per level, transformer depth 0/2/10 (middle 10),
context 2048, ADM input 2816, GEGLU feed-forward (inner 4·ch, projection 8·ch).
"""
from __future__ import annotations

from functools import lru_cache

import torch

Shapes = dict[str, tuple[tuple[int, ...], torch.dtype]]
UNET = "model.diffusion_model."
TE1 = "conditioner.embedders.0.transformer.text_model."
TE2 = "conditioner.embedders.1.model."
F = torch.float16
CONTEXT, TIME, ADM, VOCAB, TOKENS = 2048, 1280, 2816, 49408, 77


def _linear(out: Shapes, key: str, o: int, i: int, bias: bool = True) -> None:
    out[key + ".weight"] = ((o, i), F)
    if bias:
        out[key + ".bias"] = ((o,), F)


def _conv(out: Shapes, key: str, o: int, i: int, k: int) -> None:
    out[key + ".weight"] = ((o, i, k, k), F)
    out[key + ".bias"] = ((o,), F)


def _norm(out: Shapes, key: str, c: int) -> None:
    out[key + ".weight"] = ((c,), F)
    out[key + ".bias"] = ((c,), F)


def _resblock(out: Shapes, p: str, cin: int, cout: int) -> None:
    _norm(out, p + "in_layers.0", cin)
    _conv(out, p + "in_layers.2", cout, cin, 3)
    _linear(out, p + "emb_layers.1", cout, TIME)
    _norm(out, p + "out_layers.0", cout)
    _conv(out, p + "out_layers.3", cout, cout, 3)
    if cin != cout:
        _conv(out, p + "skip_connection", cout, cin, 1)


def _transformer(out: Shapes, p: str, c: int, depth: int) -> None:
    _norm(out, p + "norm", c)
    _linear(out, p + "proj_in", c, c)
    for b in range(depth):
        q = f"{p}transformer_blocks.{b}."
        for attn, ctx in (("attn1", c), ("attn2", CONTEXT)):
            _linear(out, q + attn + ".to_q", c, c, bias=False)
            _linear(out, q + attn + ".to_k", c, ctx, bias=False)
            _linear(out, q + attn + ".to_v", c, ctx, bias=False)
            _linear(out, q + attn + ".to_out.0", c, c)
        _linear(out, q + "ff.net.0.proj", 8 * c, c)
        _linear(out, q + "ff.net.2", c, 4 * c)
        for n in ("norm1", "norm2", "norm3"):
            _norm(out, q + n, c)
    _linear(out, p + "proj_out", c, c)


def _unet(out: Shapes) -> None:
    u = UNET
    _linear(out, u + "time_embed.0", TIME, 320)
    _linear(out, u + "time_embed.2", TIME, TIME)
    _linear(out, u + "label_emb.0.0", TIME, ADM)
    _linear(out, u + "label_emb.0.2", TIME, TIME)
    _conv(out, u + "input_blocks.0.0", 320, 4, 3)
    levels = ((320, 0), (640, 2), (1280, 10))
    skips, ch, block = [320], 320, 1
    for level, (c, depth) in enumerate(levels):
        for _ in range(2):
            p = f"{u}input_blocks.{block}."
            _resblock(out, p + "0.", ch, c)
            if depth:
                _transformer(out, p + "1.", c, depth)
            ch = c
            skips.append(ch)
            block += 1
        if level < len(levels) - 1:
            _conv(out, f"{u}input_blocks.{block}.0.op", ch, ch, 3)
            skips.append(ch)
            block += 1
    _resblock(out, u + "middle_block.0.", ch, ch)
    _transformer(out, u + "middle_block.1.", ch, 10)
    _resblock(out, u + "middle_block.2.", ch, ch)
    block = 0
    for level, (c, depth) in reversed(list(enumerate(levels))):
        for i in range(3):
            p = f"{u}output_blocks.{block}."
            _resblock(out, p + "0.", ch + skips.pop(), c)
            ch = c
            if depth:
                _transformer(out, p + "1.", c, depth)
            if level and i == 2:
                _conv(out, p + f"{2 if depth else 1}.conv", c, c, 3)
            block += 1
    _norm(out, u + "out.0", 320)
    _conv(out, u + "out.2", 4, 320, 3)


def _clip_l(out: Shapes) -> None:
    t, d = TE1, 768
    out[t + "embeddings.position_ids"] = ((1, TOKENS), torch.int64)
    out[t + "embeddings.position_embedding.weight"] = ((TOKENS, d), F)
    out[t + "embeddings.token_embedding.weight"] = ((VOCAB, d), F)
    for n in range(12):
        p = f"{t}encoder.layers.{n}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            _linear(out, p + "self_attn." + proj, d, d)
        _norm(out, p + "layer_norm1", d)
        _linear(out, p + "mlp.fc1", 4 * d, d)
        _linear(out, p + "mlp.fc2", d, 4 * d)
        _norm(out, p + "layer_norm2", d)
    _norm(out, t + "final_layer_norm", d)


def _open_clip_g(out: Shapes) -> None:
    t, d = TE2, 1280
    out[t + "logit_scale"] = ((), F)
    out[t + "positional_embedding"] = ((TOKENS, d), F)
    out[t + "text_projection"] = ((d, d), F)
    out[t + "token_embedding.weight"] = ((VOCAB, d), F)
    _norm(out, t + "ln_final", d)
    for n in range(32):
        p = f"{t}transformer.resblocks.{n}."
        out[p + "attn.in_proj_weight"] = ((3 * d, d), F)
        out[p + "attn.in_proj_bias"] = ((3 * d,), F)
        _linear(out, p + "attn.out_proj", d, d)
        _norm(out, p + "ln_1", d)
        _norm(out, p + "ln_2", d)
        _linear(out, p + "mlp.c_fc", 4 * d, d)
        _linear(out, p + "mlp.c_proj", d, 4 * d)


@lru_cache(maxsize=None)
def sdxl_checkpoint_shapes(unet: bool = True, text_encoders: bool = True) -> Shapes:
    """key -> (shape, dtype) of an SDXL base checkpoint in its original layout (fp16; position ids int64)."""
    out: Shapes = {}
    if unet:
        _unet(out)
    if text_encoders:
        _clip_l(out)
        _open_clip_g(out)
    return out
