"""LoRA rSVD Merge: a ComfyUI custom node pack (the nodes in ./nodes, the math in ./merge_core).

ComfyUI imports this folder as a package under a name made from its path, whatever the folder is called.
ComfyUI has its own top-level module `nodes`, so the pack's node package is imported relatively (it is
`<this package>.nodes`, never `nodes`).  `merge_core` is imported absolutely by the nodes, the CLI and the
tests alike, so this folder goes on sys.path (appended: nothing of ComfyUI's can be shadowed) and the
import is checked to be ours.
"""
import sys
from pathlib import Path

_PACK_ROOT = Path(__file__).resolve().parent
if str(_PACK_ROOT) not in sys.path:
    sys.path.append(str(_PACK_ROOT))

import merge_core  # noqa: E402

if Path(merge_core.__file__).resolve().parent != _PACK_ROOT / "merge_core":
    raise ImportError(f"another package named merge_core ({merge_core.__file__}) shadows the one of "
                      f"LoRA rSVD Merge in {_PACK_ROOT}; remove it from the Python path")

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402

WEB_DIRECTORY = "./js"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
