"""Everything the nodes take from ComfyUI at run time: model folders, the output folder, the torch device,
the progress bar with its interrupt check, and freeing memory afterwards.

ComfyUI modules are imported inside the functions, so the node modules import (and their specs build)
wherever merge_core does.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, TypeVar

import torch

from merge_core.device import host_compute_device
from merge_core.errors import InputFileError, OutputExistsError, UnsafePathError
from merge_core.files.atomic import inside

T = TypeVar("T")
DEVICES = ("default", "cpu")
DEVICE_TOOLTIP = ("default: ComfyUI's torch device when it is a CUDA/ROCm GPU, else the CPU (Apple MPS, DirectML "
                  "and XPU lack the fp64 and linear-algebra kernels the exact merges use); cpu: compute on the CPU")
MAX_COUNTER_TRIES = 10_000


def torch_device(choice: str) -> torch.device:
    """`default` -> ComfyUI's device (comfy.model_management.get_torch_device()) when merge_core computes on
    it (CUDA, ROCm), else the CPU; `cpu` -> the CPU."""
    if choice == "cpu":
        return torch.device("cpu")
    import comfy.model_management

    return host_compute_device(comfy.model_management.get_torch_device())


def filename_list(folder: str) -> list[str]:
    import folder_paths

    return folder_paths.get_filename_list(folder)


def model_file(folder: str, name: str) -> Path:
    """The full path of `name` in ComfyUI's `folder` folders (loras, checkpoints), or a clear error."""
    import folder_paths

    path = folder_paths.get_full_path(folder, name)
    if path is None or not os.path.exists(path):
        raise InputFileError(f"'{name}' not found in ComfyUI's {folder} folders")
    return Path(path)


def file_signature(folder: str, name: str) -> str:
    """Changes when the file changes on disk (for IS_CHANGED), so a replaced file is read again."""
    import folder_paths

    path = folder_paths.get_full_path(folder, name)
    if path is None or not os.path.exists(path):
        return "missing"
    st = os.stat(path)
    return f"{st.st_mtime_ns}:{st.st_size}"


class ComfyProgress:
    """A merge_core Progress callback: moves a ComfyUI progress bar and stops when the user cancels."""

    def __init__(self) -> None:
        self.bar = None

    def __call__(self, done: int, total: int, name: str) -> None:
        import comfy.model_management
        import comfy.utils

        comfy.model_management.throw_exception_if_processing_interrupted()
        if self.bar is None:
            self.bar = comfy.utils.ProgressBar(total)
        self.bar.update_absolute(done, total)


def run_job(job: Callable[[ComfyProgress], T]) -> T:
    """Run one merge_core operation with a progress bar; free cached GPU memory however it ends."""
    import comfy.model_management

    comfy.model_management.throw_exception_if_processing_interrupted()
    try:
        return job(ComfyProgress())
    finally:
        comfy.model_management.soft_empty_cache()


def output_root() -> Path:
    import folder_paths

    return Path(folder_paths.get_output_directory()).resolve()


def save_numbered(prefix: str, suffix: str, write: Callable[[Path], Path]) -> Path:
    """Write `<prefix>_00001_<suffix>` under ComfyUI's output folder with the next free counter (as SaveImage
    numbers images); never replaces a file, refuses prefixes that leave the output folder.

    `write(path)` must refuse an existing path (merge_core writes with overwrite=False, atomically), so a file
    that appears between the check and the write moves the counter on instead of being replaced.
    """
    import folder_paths

    root = output_root()
    target = inside(root, prefix.strip())
    if target == root:
        raise UnsafePathError(f"filename prefix '{prefix}' names no file inside the output folder")
    folder, filename, counter, _, _ = folder_paths.get_save_image_path(str(target.relative_to(root)), str(root))
    for _ in range(MAX_COUNTER_TRIES):
        path = Path(folder) / f"{filename}_{counter:05}_{suffix}"
        counter += 1
        if path.exists():
            continue
        try:
            return write(path)
        except OutputExistsError:
            continue
    raise OutputExistsError(f"no free file name for prefix '{prefix}' in {folder}")


def relative_to_output(path: Path) -> str:
    return Path(path).resolve().relative_to(output_root()).as_posix()
