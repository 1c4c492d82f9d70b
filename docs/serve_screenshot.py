"""Take docs/serve-page.png: the chat page of `xiaolm serve` in headless Chromium, two turns in.

    python docs/serve_screenshot.py --ckpt runs/speedrun/dpo --out docs/serve-page.png

Needs Debian's chromium and chromium-driver and the dev extras (selenium); it reuses the browser
test's server and browser setup (tests/serve_helpers.py, tests/test_serve_page.py).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from serve_helpers import run_server  # noqa: E402
from test_serve_page import last_state, send, set_control, start_browser, wait  # noqa: E402

QUESTIONS = ["你好，请介绍一下你自己。", "三国演义讲的是什么？"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", type=Path, required=True, help="a chat checkpoint (after SFT/DPO)")
    parser.add_argument("--out", type=Path, default=Path("docs/serve-page.png"))
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    with run_server(args.ckpt, model_name=args.ckpt.name) as served, tempfile.TemporaryDirectory() as profile:
        driver = start_browser(profile)
        try:
            driver.get(served.url + "/")
            wait(driver, lambda d: d.execute_script("return document.body.dataset.ready === 'true'"))
            set_control(driver, "system", "你是小模型 xiaolm。")
            set_control(driver, "seed", args.seed)
            set_control(driver, "max-tokens", 96)
            for question in QUESTIONS:
                send(driver, question)
                wait(driver, lambda d: last_state(d) == "done")
            driver.save_screenshot(str(args.out))
        finally:
            driver.quit()
    print(f"screenshot written to {args.out}")


if __name__ == "__main__":
    main()
