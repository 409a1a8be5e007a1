#!/usr/bin/env bash
# Install everything the test-suite needs on a fresh CI machine (Python 3.11, CPU, registries only):
#   1. torch==2.13.0 (the CPU wheel), 2. tests/requirements-test.txt under tests/constraints.txt,
#   3. a real ComfyUI 0.3.75 into ~/.cache/lora-rsvd-merge (tests/comfy_host/install.py).
# Idempotent: each step is skipped when already satisfied (a second run takes about a second).
# Environment: PYTHON (default: python), LORA_RSVD_COMFYUI_DIR (ComfyUI location).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python}"
REQ=tests/requirements-test.txt
CON=tests/constraints.txt
export PIP_DISABLE_PIP_VERSION_CHECK=1

# Exit 0 when every "name==version" line of the given files is installed at that version.
pins_satisfied() {
    "$PY" - "$@" <<'PYEOF'
import re, sys
from importlib import metadata
bad = []
for path in sys.argv[1:]:
    for line in open(path, encoding="utf-8"):
        line = line.split("#", 1)[0].strip()
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s;]+)", line)
        if not m:
            continue
        name, want = m.groups()
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            bad.append(f"{name} (missing)")
            continue
        if have.split("+", 1)[0] != want:
            bad.append(f"{name} {have} != {want}")
if bad:
    print("to install: " + ", ".join(bad), file=sys.stderr)
    sys.exit(1)
PYEOF
}

echo "== torch"
if "$PY" -c 'import sys, importlib.metadata as m; sys.exit(m.version("torch").split("+")[0] != "2.13.0")' 2>/dev/null; then
    echo "torch 2.13.0 already installed"
else
    "$PY" -m pip install -c "$CON" torch==2.13.0
fi

echo "== test requirements"
if pins_satisfied "$REQ"; then
    echo "requirements already satisfied"
else
    "$PY" -m pip install -c "$CON" -r "$REQ"
    pins_satisfied "$REQ"
fi

echo "== ComfyUI"
"$PY" tests/comfy_host/install.py
