"""Screenshot the pack's nodes in the real ComfyUI frontend: docs/nodes.png.

Starts a headless ComfyUI 0.3.75 (tests/comfy_host) with two small synthetic SDXL LoRAs, opens the
rSVD-merge example workflow in Debian's chromium through playwright, runs it (so Preview Image shows the
Merge Report chart) and saves the picture.  Needs `apt-get install chromium` and `pip install playwright`.

    python tools/screenshot_nodes.py [--workflow NAME] [--out docs/nodes.png]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "tests", ROOT / "tests" / "integration"):
    sys.path.insert(0, str(p))

from comfy_host import ComfyServer  # noqa: E402
from nodes_support import CONV_NAME, MODULE_NAMES, lora_tensors, specs, write  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
WIDTH, HEIGHT = 1800, 1000
SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False}


def close_banner(page, width: int) -> None:
    """Dismiss the frontend's announcement bar (its close button sits at the bar's right end), if shown."""
    if page.locator("text=Introducing").count():
        page.mouse.click(width - 33, 20)


def fit_view(page) -> None:
    """The frontend's "fit view" command (the `.` key)."""
    page.evaluate("() => window.app.extensionManager.command.execute('Comfy.Canvas.FitView')")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workflow", default="rsvd_merge_two_sdxl_loras")
    parser.add_argument("--out", default=str(ROOT / "docs" / "nodes.png"))
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    workflow = json.loads((ROOT / "example_workflows" / f"{args.workflow}.json").read_text("utf-8"))
    with tempfile.TemporaryDirectory() as tmp:
        loras = Path(tmp) / "loras"
        module_specs = specs(MODULE_NAMES + (CONV_NAME,))
        write(loras / "sdxl_style_a.safetensors", lora_tensors(module_specs, rank=8, seed=1))
        write(loras / "sdxl_style_b.safetensors", lora_tensors(module_specs, rank=16, seed=2))
        server = ComfyServer(loras_dir=loras, workdir=Path(tmp) / "work")
        (server.workdir or Path(tmp) / "work").mkdir(parents=True, exist_ok=True)
        settings = Path(tmp) / "work" / "user" / "default" / "comfy.settings.json"
        settings.parent.mkdir(parents=True, exist_ok=True)
        settings.write_text(json.dumps(SETTINGS))
        with server, sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": WIDTH, "height": HEIGHT})
            page.goto(server.url)
            page.wait_for_function("() => window.app && window.app.graph", timeout=60_000)
            time.sleep(3)
            page.evaluate("wf => window.app.loadGraphData(wf)", workflow)
            time.sleep(1)
            page.evaluate("() => window.app.queuePrompt(0)")
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and not server.get_json("/history"):
                time.sleep(0.5)
            time.sleep(2)
            close_banner(page, WIDTH)
            fit_view(page)
            time.sleep(1)
            page.screenshot(path=args.out)
            browser.close()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
