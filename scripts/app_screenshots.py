"""Screenshots of `lgq-app`'s two tabs with headless Chromium (Debian's chromium + chromium-driver, Selenium).

    python scripts/app_screenshots.py --pipeline outputs/demo/pipeline --output docs/images --image some.png

Starts the app on a free local port, opens it in the system browser (never a downloaded one), generates one
class on the Generate tab and tokenizes ``--image`` on the Tokenize tab, and writes ``app_generate.png`` and
``app_tokenize.png``. ``chromium_driver`` is also what tests/test_app.py drives the page with.
"""
from __future__ import annotations

import argparse
import shutil
import socket
import sys
import tempfile
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1280,900")


def find_chromium() -> tuple[str | None, str | None]:
    """(chromium, chromedriver) paths from PATH, or None where missing (apt-get install chromium chromium-driver)."""
    return (shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver"))


def chromium_driver(profile_dir: str | Path, window: str = "1280,900"):
    """A Selenium WebDriver on headless Chromium with a fresh profile in ``profile_dir``."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver = find_chromium()
    if browser is None or driver is None:
        raise FileNotFoundError("chromium and chromedriver are needed: apt-get install -y chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag if not flag.startswith("--window-size") else f"--window-size={window}")
    options.add_argument(f"--user-data-dir={profile_dir}")
    return webdriver.Chrome(service=Service(driver), options=options)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def save(browser, path: Path) -> None:
    """A screenshot of the page's top, as a 256-colour PNG (small enough for the README)."""
    from PIL import Image

    browser.execute_script("window.scrollTo(0, 0)")
    browser.save_screenshot(str(path))
    with Image.open(path) as shot:
        shot.convert("RGB").quantize(256).save(path, optimize=True)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", default="outputs/demo/pipeline")
    parser.add_argument("--output", default="docs/images")
    parser.add_argument("--image", required=True, help="the image to tokenize on the Tokenize tab")
    parser.add_argument("--class-name", default=None, help="the class to generate (default: the first)")
    parser.add_argument("--num-images", type=int, default=8)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from pipelines import LGQPipeline
    from pipelines.app import build_app, class_choices

    pipeline = LGQPipeline.from_pretrained(args.pipeline)
    app = build_app(pipeline, title=f"lgq: {Path(args.pipeline).name}")
    port = free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as profile:
        browser = chromium_driver(profile, window="1100,760")
        try:
            browser.get(f"http://127.0.0.1:{port}/")
            wait = WebDriverWait(browser, 120)
            wait.until(lambda b: b.find_elements(By.ID, "generate-button"))
            if args.class_name is not None and args.class_name != class_choices(pipeline)[0]:
                field = browser.find_element(By.CSS_SELECTOR, "#class-name input")
                field.click()
                wait.until(lambda b: b.find_elements(By.XPATH, f"//li[@aria-label='{args.class_name}']"))[0].click()
            count = browser.find_element(By.CSS_SELECTOR, "#num-images input[type=number]")
            count.clear()
            count.send_keys(str(args.num_images))
            browser.find_element(By.ID, "generate-button").click()
            wait.until(lambda b: "image(s)" in b.find_element(By.ID, "generate-summary").text)
            save(browser, output / "app_generate.png")
            browser.find_element(By.XPATH, "//button[@role='tab' and contains(., 'Tokenize')]").click()
            wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#upload input[type=file]"))
            browser.find_element(By.CSS_SELECTOR, "#upload input[type=file]").send_keys(str(Path(args.image).resolve()))
            wait.until(lambda b: "PSNR" in b.find_element(By.ID, "tokenize-summary").text)
            save(browser, output / "app_tokenize.png")
        finally:
            browser.quit()
            app.close()
    print(f"wrote {output / 'app_generate.png'} and {output / 'app_tokenize.png'}")


if __name__ == "__main__":
    main()
