"""lgq-app (pipelines/app.py): the Generate and Tokenize functions, then the page itself in headless Chromium.

The browser test needs Debian's chromium + chromium-driver and the [app] extra; it is skipped without them unless
LGQ_REQUIRE_BROWSER=1 (set by .ci/run), which turns a missing browser into a failure."""
from __future__ import annotations

import importlib.util
import os
import re
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common.metrics import psnr
from pipelines import LGQPipeline
from pipelines import app as lgq_app
from prior.maskgit import MaskGITPrior
from prior.scheduler import MaskGITScheduler
from test_pipeline import GRID, K, NUM_CLASSES, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["astronaut", "coffee", "rocket", "chelsea"]
REQUIRE_BROWSER = os.environ.get("LGQ_REQUIRE_BROWSER", "") not in ("", "0")


@pytest.fixture(scope="module")
def pipe() -> LGQPipeline:
    torch.manual_seed(1)
    prior = MaskGITPrior(codebook_size=K, num_classes=NUM_CLASSES, grid_size=GRID, hidden_size=32, num_layers=1,
                         num_heads=2, class_names=NAMES)
    return LGQPipeline(tokenizer=tiny_tokenizer(), prior=prior, scheduler=MaskGITScheduler(codebook_size=K))


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    """Test uploads: a colour photo-like PNG, grey-scale, RGBA, a huge one, and a text file named .png."""
    folder = tmp_path_factory.mktemp("uploads")
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:24, 0:20]
    colour = np.stack([x * 12, y * 10, (x + y) * 6], axis=-1) + rng.integers(0, 30, (24, 20, 3))
    files = {"colour": folder / "colour.png", "grey": folder / "grey.png", "rgba": folder / "rgba.png",
             "huge": folder / "huge.png", "text": folder / "notes.png"}
    Image.fromarray(colour.clip(0, 255).astype(np.uint8)).save(files["colour"])
    Image.fromarray((y * 10).astype(np.uint8)).save(files["grey"])
    rgba = np.concatenate([colour.clip(0, 255), np.full((24, 20, 1), 128)], axis=-1).astype(np.uint8)
    Image.fromarray(rgba, mode="RGBA").save(files["rgba"])
    Image.new("L", (5000, 4000)).save(files["huge"])  # 20 MP of zeros: a small file
    files["text"].write_text("not an image\n")
    return files


def test_generate_returns_the_pipelines_tokens_and_reports_progress(pipe, tmp_path):
    fractions = []
    shown, tokens_file, summary = lgq_app.generate(pipe, "rocket", 3, 4, 2.0, 0.9, 5,
                                                   progress=lambda f, text: fractions.append(f), output_dir=tmp_path)
    expected = pipe([2] * 3, num_inference_steps=4, guidance_scale=2.0, temperature=0.9, output_type="latent",
                    generator=[torch.Generator().manual_seed(5 + i) for i in range(3)]).images
    saved = np.load(tokens_file)
    np.testing.assert_array_equal(saved["tokens"], expected.numpy())
    np.testing.assert_array_equal(saved["labels"], [2, 2, 2])
    assert len(shown) == 3 and shown[0].size[0] >= pipe.image_size[1] and "3 image(s) of class 'rocket'" in summary
    assert fractions == [0.25, 0.5, 0.75, 1.0]
    # image i depends on seed + i only
    one, _, _ = lgq_app.generate(pipe, "rocket", 1, 4, 2.0, 0.9, 6, output_dir=tmp_path)
    np.testing.assert_array_equal(np.asarray(one[0]), np.asarray(shown[1]))


@pytest.mark.parametrize("field, value, message", [
    ("class_name", "tea", "unknown class 'tea'"), ("num_images", 0, "number of images"),
    ("num_images", 17, "between 1 and 16"), ("steps", 2.5, "steps"), ("guidance", -1, "guidance"),
    ("temperature", 0, "temperature must be a positive"), ("seed", "abc", "seed"), ("temperature", None, "temperature")])
def test_generate_names_bad_settings(pipe, field, value, message):
    settings = dict(class_name="coffee", num_images=2, steps=2, guidance=1.0, temperature=1.0, seed=0)
    settings[field] = value
    with pytest.raises(lgq_app.AppInputError, match=re.escape(message)):
        lgq_app.generate(pipe, **settings)


def test_tokenize_reconstructs_and_counts_codes(pipe, images):
    seen, reconstruction, token_map, summary = lgq_app.tokenize(pipe, images["colour"])
    h, w = pipe.image_size
    image, notes = lgq_app.load_upload(images["colour"])
    assert notes == []
    from torchvision.transforms import functional as TF

    cropped = TF.center_crop(TF.resize(image, min(h, w), antialias=True), [h, w])
    pixels = TF.pil_to_tensor(cropped).unsqueeze(0).float() / 127.5 - 1
    with torch.no_grad():
        indices = pipe.tokenizer.encode(pixels)
        expected_psnr = float(psnr(pixels, pipe.tokenizer.decode(indices).clamp(-1, 1))[0])
    assert f"PSNR {expected_psnr:.2f} dB" in summary
    assert f"{len(torch.unique(indices))} distinct codes of K = {K}" in summary and "resized" in summary
    assert token_map.size == (GRID * (lgq_app.DISPLAY_PIXELS // GRID),) * 2
    colours = lgq_app.code_colours(K)
    corner = np.asarray(token_map)[0, 0]
    np.testing.assert_array_equal(corner, colours[int(indices[0, 0, 0])])
    assert len({tuple(c) for c in colours}) == K  # one colour per code
    assert seen.size == reconstruction.size


def test_uploads_that_are_not_rgb_images(pipe, images):
    for name, message in (("text", "is not an image"), ("huge", "too large")):
        with pytest.raises(lgq_app.AppInputError, match=message):
            lgq_app.tokenize(pipe, images[name])
    with pytest.raises(lgq_app.AppInputError, match="upload an image"):
        lgq_app.tokenize(pipe, None)
    grey, notes = lgq_app.load_upload(images["grey"])
    assert grey.mode == "RGB" and "grey-scale" in notes[0]
    rgba, notes = lgq_app.load_upload(images["rgba"])
    assert rgba.mode == "RGB" and "alpha" in notes[0]
    original = np.asarray(Image.open(images["rgba"])).astype(np.float64)
    over_white = original[..., :3] * (128 / 255) + 255 * (1 - 128 / 255)
    np.testing.assert_allclose(np.asarray(rgba), over_white, atol=1.0)
    assert "grey-scale" in lgq_app.tokenize(pipe, images["grey"])[3]


def _browser_or_skip():
    missing = [name for name in ("gradio", "selenium") if importlib.util.find_spec(name) is None]
    screenshots = _load_screenshots_script()
    if None in screenshots.find_chromium():
        missing.append("chromium + chromedriver (apt-get install chromium chromium-driver)")
    if missing:
        if REQUIRE_BROWSER:
            pytest.fail(f"LGQ_REQUIRE_BROWSER is set but {', '.join(missing)} is missing")
        pytest.skip(f"needs {', '.join(missing)} (pip install -e '.[app]')")
    return screenshots


def _load_screenshots_script():
    spec = importlib.util.spec_from_file_location("app_screenshots", ROOT / "scripts" / "app_screenshots.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_app_in_headless_chromium(pipe, images, tmp_path, monkeypatch):
    screenshots = _browser_or_skip()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    app = lgq_app.build_app(pipe)
    port = screenshots.free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    browser = screenshots.chromium_driver(tmp_path / "profile")
    try:
        wait = WebDriverWait(browser, 120)
        browser.get(f"http://127.0.0.1:{port}/")
        wait.until(lambda b: b.find_elements(By.ID, "generate-button"))
        assert "4 classes" in browser.page_source

        def set_number(element_id: str, value) -> None:
            field = browser.find_element(By.CSS_SELECTOR, f"#{element_id} input")
            field.clear()
            field.send_keys(str(value))

        # Generate: 3 images of the default class (astronaut), seed 7
        set_number("num-images", 3)
        set_number("seed", 7)
        set_number("steps", 4)
        browser.find_element(By.ID, "generate-button").click()
        wait.until(lambda b: "image(s)" in b.find_element(By.ID, "generate-summary").text)
        assert "3 image(s) of class 'astronaut'" in browser.find_element(By.ID, "generate-summary").text
        assert len(browser.find_elements(By.CSS_SELECTOR, "#samples img")) == 3
        link = wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#tokens-file a[href]"))[0]
        downloaded = tmp_path / "tokens.npz"
        urllib.request.urlretrieve(link.get_attribute("href"), downloaded)
        expected = pipe([0] * 3, num_inference_steps=4, guidance_scale=3.0, output_type="latent",
                        generator=[torch.Generator().manual_seed(7 + i) for i in range(3)]).images
        np.testing.assert_array_equal(np.load(downloaded)["tokens"], expected.numpy())
        # a bad setting: the message in the page, no traceback
        set_number("temperature", 0)
        browser.find_element(By.ID, "generate-button").click()
        wait.until(lambda b: "temperature must be a positive number" in b.page_source)
        assert "Traceback" not in browser.page_source

        # Tokenize: an image, then bad uploads
        browser.find_element(By.XPATH, "//button[@role='tab' and contains(., 'Tokenize')]").click()

        def upload(path: Path) -> None:
            wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#upload input[type=file]"))
            browser.find_element(By.CSS_SELECTOR, "#upload input[type=file]").send_keys(str(path))

        def clear_upload() -> None:
            buttons = browser.find_elements(By.CSS_SELECTOR, "#upload button[aria-label='Clear']")
            if buttons:
                buttons[0].click()

        upload(images["colour"])
        wait.until(lambda b: "PSNR" in b.find_element(By.ID, "tokenize-summary").text)
        summary = browser.find_element(By.ID, "tokenize-summary").text
        assert summary.startswith(lgq_app.tokenize(pipe, images["colour"])[3].split(";")[0])
        for element_id in ("input-image", "reconstruction", "token-map"):
            assert browser.find_elements(By.CSS_SELECTOR, f"#{element_id} img"), element_id
        clear_upload()
        upload(images["grey"])
        wait.until(lambda b: "grey-scale" in b.find_element(By.ID, "tokenize-summary").text)
        for name, message in (("text", "is not an image"), ("huge", "too large")):
            clear_upload()
            upload(images[name])
            wait.until(lambda b, message=message: message in b.page_source)
        assert "Traceback" not in browser.page_source
    finally:
        browser.quit()
        app.close()
