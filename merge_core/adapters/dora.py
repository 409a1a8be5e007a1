"""DoRA, for baking: a learnt magnitude m rescales the patched weight, so the result is not W + s·ΔW and only a
bake (which has W) can apply it.  Two conventions, by where the file comes from:

W_c = W + ΔW;
- ComfyUI (0.3.75, weight_adapter/base.py `weight_decompose`; kohya / LyCORIS `dora_scale`): m one value per
  input column (1 × in[×1×1]): W_d = m ⊙ W_c / (‖W_c‖_col + ε), the norm of each input column over the output
  rows (and kernel); m one value per output row: W_d = m ⊙ W_c / (‖W‖_row + ε), the base weight's row norms,
  as ComfyUI computes them;  ε = fp32's machine epsilon;
- PEFT (`lora_magnitude_vector`, one value per output row; merge_and_unload): W_d = m ⊙ W_c / ‖W_c‖_row;
W' = W + s·(W_d − W) for strength s (W_d itself at s = 1).
"""
from __future__ import annotations

import torch

EPS = torch.finfo(torch.float32).eps


def _norms(W: torch.Tensor, axis: int) -> torch.Tensor:
    """‖·‖₂ of each slice of W along `axis` (0: output rows, 1: input columns), shaped to broadcast over W."""
    moved = W.transpose(0, axis)
    norm = moved.reshape(moved.shape[0], -1).norm(dim=1)
    return norm.reshape(moved.shape[0], *[1] * (W.dim() - 1)).transpose(0, axis)


def dora_weight(W: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor, strength: float,
                peft: bool = False) -> torch.Tensor:
    """W' for base weight W, the module's ΔW (α/r folded in) and DoRA magnitude m, by ComfyUI's convention or
    PEFT's (see the module docstring); all fp32, ΔW and m in any shape holding W's entries / one per row or
    column."""
    patched = W + delta.reshape(W.shape)
    if peft:
        norm = _norms(patched, 0)
    else:
        on_rows = magnitude.shape[0] == W.shape[0]  # ComfyUI's test: m's leading size is W's output count
        norm = (_norms(W, 0) if on_rows else _norms(patched, 1)) + EPS
    decomposed = patched * (magnitude.reshape(norm.shape) / norm)
    return decomposed if strength == 1.0 else W + strength * (decomposed - W)
