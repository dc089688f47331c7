"""Drive the demo in a real headless Chromium: upload or click an example, wait for the results, take a screenshot.

    python demo/screenshot.py --checkpoint checkpoints/stpnet-kvasir-seg --output docs/demo-screenshot.png

Uses Playwright from PyPI with the system's Chromium (Debian package ``chromium``); it never downloads a browser.
``tests/test_demo.py`` drives the app through the same functions.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Flags for a sandbox-less container without GPU or network.
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]
TIMEOUT_MS = 90_000  # the first request also loads the model; two busy CPU cores are slow


def find_chromium() -> str | None:
    """The system Chromium (``$STPNET_CHROMIUM`` first), or None."""
    candidates = [os.environ.get("STPNET_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"]
    for candidate in candidates:
        if candidate and (path := shutil.which(candidate)):
            return path
    return None


def why_no_browser() -> str | None:
    """Why the browser check cannot run here, or None when it can."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the Python package playwright is not installed (pip install playwright; no browser download needed)"
    if find_chromium() is None:
        return "no Chromium found: install the Debian package `chromium` or set STPNET_CHROMIUM to a Chromium binary"
    return None


def _wait_for_text(page: Any, selector: str, text: str) -> str:
    page.locator(selector).filter(has_text=text).first.wait_for(timeout=TIMEOUT_MS)
    return page.locator(selector).inner_text()


def drive(
    url: str,
    screenshot: str | os.PathLike,
    upload: str | os.PathLike | None = None,
    bad_upload: str | os.PathLike | None = None,
    example: int = 0,
) -> dict[str, str]:
    """Open the app at ``url``; optionally upload ``bad_upload`` and wait for the friendly message; then upload
    ``upload`` (or click example number ``example``), wait for the overlay and the description, take a full-page
    screenshot. Returns the texts the page showed."""
    from playwright.sync_api import sync_playwright

    seen: dict[str, str] = {}
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=find_chromium(), headless=True, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 1000}, device_scale_factor=1)
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(url)
            file_input = page.locator("#upload input[type=file]")
            file_input.wait_for(state="attached")
            if bad_upload is not None:
                file_input.set_input_files(str(bad_upload))
                seen["bad_upload"] = _wait_for_text(page, "#description", "Cannot use")
                page.locator("#upload button[aria-label='Clear']").first.click()
            if upload is not None:
                page.locator("#upload input[type=file]").set_input_files(str(upload))
            else:
                page.locator("#examples button.thumbnail-item").nth(example).click()
            page.locator("#overlay img").first.wait_for(state="visible")
            seen["description"] = _wait_for_text(page, "#description", "What the model sees")
            seen["measurements"] = _wait_for_text(page, "#measurements", "Lesion area")
            seen["bars"] = page.locator("#stpnet-bars").inner_text()
            seen["status"] = page.locator("#status").inner_text()
            page.wait_for_timeout(300)  # let the overlay image finish painting before the screenshot
            Path(screenshot).parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    return seen


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Screenshot of the STPNet demo in headless Chromium")
    parser.add_argument("--checkpoint", default=None, help="checkpoint folder or Hub id (default as the demo)")
    parser.add_argument("--output", default="docs/demo-screenshot.png")
    parser.add_argument("--example", type=int, default=0, help="which example image to click (0 = first)")
    args = parser.parse_args(argv)
    if (reason := why_no_browser()) is not None:
        print(f"Cannot take the screenshot: {reason}", file=sys.stderr)
        return 1
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import app

    demo = app.build_demo(args.checkpoint)
    _, url, _ = app.launch(demo, server_name="127.0.0.1", prevent_thread_lock=True, quiet=True)
    try:
        seen = drive(url, args.output, example=args.example)
    finally:
        demo.close()
    print(seen["description"])
    print(f"Saved {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
