"""Run by hand: start the demo, run one generation through gradio_client, then load the page in
headless Chromium and save a screenshot to look at.

    apt-get install -y chromium        # Debian's package (/usr/bin/chromium)
    python tests/demo_screenshot.py --out demo.png
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo.png")
    parser.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser") or "chromium")
    parser.add_argument("--wait-ms", type=int, default=15000, help="virtual time Chromium gives the page to render")
    args = parser.parse_args()
    from gradio_client import Client

    from diffattn.app.demo import Models, build

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo = build(Models("cpu"))
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    url = f"http://127.0.0.1:{port}/"
    start = time.perf_counter()
    result = Client(url, verbose=False).predict("video", "radial", '{"dense_steps": 2, "block_size": 64}',
                                                "a red circle moving right on a dark blue background", 0, 8, 128, 29, 3.0,
                                                api_name="/generate")
    print(f"generation through gradio_client: {time.perf_counter() - start:.1f} s\n{result[4]}")
    subprocess.run([args.chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--screenshot={args.out}",
                    "--window-size=1400,1300", f"--virtual-time-budget={args.wait_ms}", url], check=True, timeout=180)
    print(f"screenshot of {url} -> {args.out}")
    demo.close()


if __name__ == "__main__":
    main()
