"""A real, headless ComfyUI server in a subprocess, with this repo as a custom node pack.

    with ComfyServer(loras_dir=d) as srv:
        assert "LoraLoader" in srv.object_info()
        entry = srv.run({"1": {"class_type": ..., "inputs": {...}}})

Standard library only (urllib for HTTP).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Iterable, Mapping

from .inprocess import comfyui_dir

REPO_ROOT = Path(__file__).resolve().parents[2]
PACK_NAME = "lora-rsvd-merge"
LAUNCHER = Path(__file__).resolve().with_name("launch_comfyui.py")


class ComfyServerError(RuntimeError):
    """The server failed to start, refused a request, or a prompt failed/timed out."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _yaml_str(value: str) -> str:
    # A JSON string literal is a valid YAML double-quoted scalar.
    return json.dumps(str(value))


class ComfyServer:
    """Context manager running ``main.py --cpu`` on a free port of 127.0.0.1.

    Parameters
    ----------
    loras_dir, checkpoints_dir:
        folders registered as ``loras`` / ``checkpoints`` through an extra model
        paths yaml (created empty in the work dir when not given).
    extra_paths:
        more ``folder_name -> path or [paths]`` entries for the yaml (``vae``, ``clip`` ...).
    pack_dir, pack_name:
        the custom node pack to load (default: this repository as ``lora-rsvd-merge``),
        linked into a private ``custom_nodes`` folder.
    extra_args:
        more main.py arguments.
    workdir:
        where user/output/temp/input folders, the yaml and the log go (a fresh
        temporary folder, removed on exit, when not given).
    """

    def __init__(
        self,
        loras_dir: str | os.PathLike | None = None,
        checkpoints_dir: str | os.PathLike | None = None,
        *,
        extra_paths: Mapping[str, str | os.PathLike | Iterable[str | os.PathLike]] | None = None,
        pack_dir: str | os.PathLike | None = REPO_ROOT,
        pack_name: str = PACK_NAME,
        extra_args: Iterable[str] = (),
        workdir: str | os.PathLike | None = None,
        startup_timeout: float = 120.0,
        port: int | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir is not None else None
        self._loras_dir = loras_dir
        self._checkpoints_dir = checkpoints_dir
        self._extra_paths = dict(extra_paths or {})
        self.pack_dir = Path(pack_dir).resolve() if pack_dir is not None else None
        self.pack_name = pack_name
        self._extra_args = list(extra_args)
        self.startup_timeout = startup_timeout
        self.port = port
        self._env = dict(env or {})
        self.proc: subprocess.Popen | None = None
        self.url = ""
        self.log_path: Path | None = None
        self._log_file = None

    # ------------------------------------------------------------------ paths
    @property
    def output_dir(self) -> Path:
        return self.workdir / "output"

    @property
    def user_dir(self) -> Path:
        return self.workdir / "user"

    @property
    def input_dir(self) -> Path:
        return self.workdir / "input"

    @property
    def custom_nodes_dir(self) -> Path:
        return self.workdir / "custom_nodes"

    @property
    def loras_dir(self) -> Path:
        return Path(self._loras_dir) if self._loras_dir is not None else self.workdir / "loras"

    @property
    def checkpoints_dir(self) -> Path:
        return Path(self._checkpoints_dir) if self._checkpoints_dir is not None else self.workdir / "checkpoints"

    @property
    def pack_path(self) -> Path:
        """The pack's path as ComfyUI sees it (inside our custom_nodes folder)."""
        return self.custom_nodes_dir / self.pack_name

    # -------------------------------------------------------------- lifecycle
    def _prepare(self) -> list[str]:
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="comfyui-test-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        for d in (self.output_dir, self.user_dir, self.input_dir, self.custom_nodes_dir,
                  self.loras_dir, self.checkpoints_dir):
            d.mkdir(parents=True, exist_ok=True)
        if self.pack_dir is not None:
            link = self.pack_path
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(self.pack_dir, target_is_directory=True)

        folders: dict[str, list[str]] = {
            "custom_nodes": [str(self.custom_nodes_dir)],
            "loras": [str(Path(self.loras_dir).resolve())],
            "checkpoints": [str(Path(self.checkpoints_dir).resolve())],
        }
        for name, value in self._extra_paths.items():
            values = [value] if isinstance(value, (str, os.PathLike)) else list(value)
            folders.setdefault(name, []).extend(str(Path(v).resolve()) for v in values)
        lines = ["lora_rsvd_merge_tests:"]
        for name, paths in folders.items():
            lines.append(f"    {name}: {_yaml_str(chr(10).join(paths))}")
        yaml_path = self.workdir / "extra_model_paths.yaml"
        yaml_path.write_text("\n".join(lines) + "\n", encoding="utf-8")

        self.port = self.port or free_port()
        return [
            "--cpu",
            "--listen", "127.0.0.1",
            "--port", str(self.port),
            "--disable-auto-launch",
            "--disable-api-nodes",
            "--extra-model-paths-config", str(yaml_path),
            "--user-directory", str(self.user_dir),
            "--output-directory", str(self.output_dir),
            "--input-directory", str(self.input_dir),
            "--temp-directory", str(self.workdir),  # ComfyUI appends "temp"
            "--database-url", f"sqlite:///{self.workdir / 'comfyui.db'}",
            *self._extra_args,
        ]

    def start(self) -> "ComfyServer":
        if self.proc is not None:
            raise ComfyServerError("server already started")
        root = comfyui_dir()
        args = self._prepare()
        self.log_path = self.workdir / "comfyui.log"
        self._log_file = open(self.log_path, "wb")
        env = dict(os.environ)
        env.update({
            "PYTHONUNBUFFERED": "1",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "DO_NOT_TRACK": "1",
        })
        env.update(self._env)
        cmd = [sys.executable, str(LAUNCHER), str(root), *args]
        self.proc = subprocess.Popen(
            cmd, cwd=str(self.workdir), env=env, stdin=subprocess.DEVNULL,
            stdout=self._log_file, stderr=subprocess.STDOUT, start_new_session=True)
        self.url = f"http://127.0.0.1:{self.port}"
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if self.proc.poll() is not None:
                raise ComfyServerError(
                    f"ComfyUI exited with code {self.proc.returncode} during start-up:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/system_stats", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            if time.monotonic() > deadline:
                raise ComfyServerError(
                    f"ComfyUI not ready after {self.startup_timeout:.0f} s:\n{self.log_tail()}")
            time.sleep(0.2)

    def stop(self, timeout: float = 10.0) -> int | None:
        """Stop the server (SIGINT, then SIGTERM, then SIGKILL); returns its exit code."""
        proc, self.proc = self.proc, None
        code = None
        if proc is not None:
            if proc.poll() is None:
                for sig, wait in ((signal.SIGINT, timeout), (signal.SIGTERM, timeout), (signal.SIGKILL, timeout)):
                    try:
                        proc.send_signal(sig)
                    except ProcessLookupError:
                        break
                    try:
                        proc.wait(wait)
                        break
                    except subprocess.TimeoutExpired:
                        continue
            code = proc.poll()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        return code

    def cleanup(self) -> None:
        if self._own_workdir and self.workdir is not None and self.workdir.exists():
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "ComfyServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        self.cleanup()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # ------------------------------------------------------------------- logs
    def log_text(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        if self._log_file is not None:
            self._log_file.flush()
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def log_tail(self, n: int = 80) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    def pack_import_lines(self) -> list[str]:
        """The "Import times for custom nodes" lines (and import errors) that name our pack."""
        target = str(self.pack_path)
        out = []
        for line in self.log_text().splitlines():
            stripped = line.rstrip()
            if stripped.endswith(target) or f"{target} module" in stripped:
                out.append(stripped)
        return out

    def pack_import_error(self) -> str:
        """The traceback ComfyUI logged for our pack's failed import ("" if none)."""
        lines = self.log_text().splitlines()
        needle = f"Cannot import {self.pack_path} module"
        for i, line in enumerate(lines):
            if needle in line:
                start = i
                while start >= 0 and not lines[start].startswith("Traceback (most recent call last)"):
                    start -= 1
                return "\n".join(lines[start if start >= 0 else i:i + 1])
        return ""

    def import_failed(self) -> bool:
        """True when ComfyUI reported our pack as failing to import."""
        return any("IMPORT FAILED" in line or "Cannot import" in line for line in self.pack_import_lines())

    def pack_loaded(self) -> bool:
        """True when ComfyUI listed our pack among the custom nodes that imported."""
        lines = self.pack_import_lines()
        return any(" seconds: " in line for line in lines) and not self.import_failed()

    # ------------------------------------------------------------------- HTTP
    def request(self, method: str, path: str, data: Any = None, timeout: float = 60.0) -> Any:
        body = None
        headers = {}
        if data is not None:
            body = json.dumps(data).encode("utf-8")
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as err:
            detail = err.read().decode("utf-8", errors="replace")
            raise ComfyServerError(f"{method} {path} -> HTTP {err.code}: {detail}") from None
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            return raw.decode("utf-8", errors="replace")

    def get_json(self, path: str, timeout: float = 60.0) -> Any:
        return self.request("GET", path, timeout=timeout)

    def post_json(self, path: str, data: Any, timeout: float = 60.0) -> Any:
        return self.request("POST", path, data, timeout=timeout)

    def object_info(self, node_class: str | None = None) -> dict:
        if node_class is None:
            return self.get_json("/object_info")
        return self.get_json("/object_info/" + urllib.parse.quote(node_class, safe=""))

    def submit(self, prompt: Mapping[str, Any], client_id: str | None = None) -> str:
        """Queue an API-format prompt; returns its prompt_id (raises on a refused graph)."""
        payload = {"prompt": prompt, "client_id": client_id or uuid.uuid4().hex}
        reply = self.post_json("/prompt", payload)
        if not isinstance(reply, dict) or "prompt_id" not in reply:
            raise ComfyServerError(f"/prompt refused the graph: {reply}")
        if reply.get("node_errors"):
            raise ComfyServerError(f"/prompt node errors: {reply['node_errors']}")
        return reply["prompt_id"]

    def history(self, prompt_id: str) -> dict | None:
        reply = self.get_json("/history/" + urllib.parse.quote(prompt_id, safe=""))
        if isinstance(reply, dict):
            return reply.get(prompt_id)
        return None

    def wait(self, prompt_id: str, timeout: float = 120.0, poll: float = 0.1) -> dict:
        """Wait until the prompt finished; returns its history entry.

        The entry has ``status`` (``status_str`` "success"/"error", ``messages``)
        and ``outputs`` (each output node's ``ui`` dict).  Raises on timeout or if
        the server died.
        """
        deadline = time.monotonic() + timeout
        while True:
            entry = self.history(prompt_id)
            if entry is not None:  # ComfyUI adds the entry when the prompt is done
                return entry
            if not self.running:
                raise ComfyServerError(f"ComfyUI died while running {prompt_id}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise ComfyServerError(f"prompt {prompt_id} not done after {timeout:.0f} s:\n{self.log_tail()}")
            time.sleep(poll)

    def run(self, prompt: Mapping[str, Any], timeout: float = 120.0, check: bool = True) -> dict:
        """submit + wait; with ``check`` raise unless the status is "success"."""
        entry = self.wait(self.submit(prompt), timeout=timeout)
        if check and entry.get("status", {}).get("status_str") != "success":
            raise ComfyServerError(
                f"prompt failed: {json.dumps(entry.get('status'), indent=1)[:4000]}\n{self.log_tail()}")
        return entry

    @staticmethod
    def error_messages(entry: dict) -> list:
        """The ``execution_error`` message payloads of a history entry."""
        return [m[1] for m in entry.get("status", {}).get("messages", []) if m and m[0] == "execution_error"]
