"""Run by hand: start the demo, load the page in headless Chromium, set a short generation, click
"Generate", wait for both outputs and save a screenshot to look at.

    apt-get install -y chromium && pip install playwright     # Debian's Chromium; playwright drives it
    python tests/demo_screenshot.py --out benchmarks/testbed/demo.png

Without playwright it falls back to Chromium's own ``--screenshot`` of the page as loaded (no generation).
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import time


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo.png")
    parser.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser") or "chromium")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--guide", default=None, help="also pick this attention guidance (e.g. soft-pag) before Generate")
    args = parser.parse_args()
    from diffattn.app.demo import Models, build

    demo = build(Models("cpu"))
    port = _free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        subprocess.run([args.chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--screenshot={args.out}", "--window-size=1400,1300", "--virtual-time-budget=15000", url],
                       check=True, timeout=180)
        print(f"screenshot of {url} as loaded -> {args.out} (pip install playwright to click Generate first)")
        demo.close()
        return
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1350})
        page.goto(url)
        page.get_by_label("steps").first.fill(str(args.steps))
        if args.guide:
            page.get_by_label("attention guidance").first.click()
            page.get_by_role("option", name=args.guide, exact=True).click()
        start = time.perf_counter()
        page.get_by_role("button", name="Generate").click()
        page.wait_for_selector("text=mask density", timeout=300_000)
        page.wait_for_timeout(1500)  # the videos' first frames
        print(f"generation in the browser: {time.perf_counter() - start:.1f} s")
        page.screenshot(path=args.out, full_page=True)
        browser.close()
    print(f"screenshot of {url} after a generation -> {args.out}")
    demo.close()


if __name__ == "__main__":
    main()
