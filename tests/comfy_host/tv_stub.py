"""Make ``import torchvision`` work with the CPU torch wheel.

PyPI's torchvision 0.28.0 wheel is built against CUDA torch; next to the CPU torch
wheel its C extension (``torchvision/_C.so``) does not load, and importing
torchvision then fails with ``operator torchvision::nms does not exist`` (its
Python side registers fake kernels for ops the extension should have defined).
ComfyUI imports torchvision at start-up.  Defining the two op schemas ourselves
before that import is enough for everything ComfyUI needs here; the ops
themselves stay unusable.

Where the extension does load (a matching torchvision build) it defines the real
ops, and nothing is stubbed.  The ``Library`` object is kept alive for the life of
the process (dropping it would unregister the schemas).  Import nothing from
ComfyUI here: this module runs before ComfyUI is importable.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_LIB = None  # keeps the torch.library.Library (and its definitions) alive

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}


def _has_schema(name: str) -> bool:
    import torch

    try:
        getattr(torch.ops.torchvision, name).default  # noqa: B018
        return True
    except (AttributeError, RuntimeError):
        return False


def _try_load_real_extension() -> None:
    import torch

    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return
    pkg = Path(spec.origin).parent
    for lib in sorted(pkg.glob("_C*.so")) + sorted(pkg.glob("_C*.pyd")):
        try:
            torch.ops.load_library(str(lib))
            return
        except (ImportError, OSError):
            continue


def apply_torchvision_stub() -> bool:
    """Define ``torchvision::nms`` / ``torchvision::qnms`` when torchvision can't.

    Returns True when stub schemas were defined, False when none were needed
    (torchvision's own extension loads, or a previous call already stubbed them).
    Safe to call any number of times, before or instead of importing torchvision.
    """
    global _LIB
    import torch

    if all(_has_schema(name) for name in _SCHEMAS):
        return False
    _try_load_real_extension()
    missing = [name for name in _SCHEMAS if not _has_schema(name)]
    if not missing:
        return False
    if _LIB is None:
        _LIB = torch.library.Library("torchvision", "DEF")  # noqa: TOR901
    for name in missing:
        _LIB.define(_SCHEMAS[name])
    return True


class _StubBeforeTorchvision:
    """A ``sys.meta_path`` entry that applies the stub when torchvision is first imported.

    Lets a launcher prepare the process without importing torch itself (ComfyUI
    warns when torch is imported before its main.py ran).
    """

    def find_spec(self, fullname, path=None, target=None):
        if fullname == "torchvision":
            remove_import_hook()
            apply_torchvision_stub()
        return None  # never finds anything itself


_HOOK = _StubBeforeTorchvision()


def install_import_hook() -> None:
    """Apply the stub lazily, right before the first ``import torchvision``."""
    if "torchvision" in sys.modules:
        return
    if _HOOK not in sys.meta_path:
        sys.meta_path.insert(0, _HOOK)


def remove_import_hook() -> None:
    while _HOOK in sys.meta_path:
        sys.meta_path.remove(_HOOK)


if __name__ == "__main__":  # manual check: python tests/comfy_host/tv_stub.py
    print("stubbed" if apply_torchvision_stub() else "not needed")
    import torchvision

    print("torchvision", torchvision.__version__, "imports")
