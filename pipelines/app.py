"""`lgq-app`: a Gradio page on a pipeline folder, to look at what the models do (``pip install -e ".[app]"``).

    lgq-app --pipeline outputs/demo/pipeline          # or: make app (after make demo); python -m pipelines.app

Two tabs:

* **Generate**: a class by name, the number of images, MaskGIT steps, guidance s, temperature and seed -> a
  progress bar over the sampling steps, the grid of images, and the token grids as a download
  (``tokens.npz``: ``tokens`` int64 [N, h, w] in [0, K), ``labels``);
* **Tokenize**: an uploaded image, resized (shorter side) and centre-cropped to the pipeline's image size as the
  training data are -> its reconstruction decode(encode(x)), PSNR = 10 log10(1 / MSE) on [0, 1] (common.metrics),
  the token-index map as a coloured grid (one colour per code) and how many distinct codes it used.

Bad input is answered in the page (``gr.Error``), never with a stack trace: a file that is not an image, an image
over ``MAX_IMAGE_PIXELS``, out-of-range settings. Grey-scale and RGBA images are converted to RGB (RGBA over white)
and the page says so.
"""
from __future__ import annotations

import argparse
import colorsys
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms import functional as TF

from common.metrics import psnr
from pipelines.pipeline_lgq import LGQPipeline

MAX_IMAGES = 16            # per Generate click
MAX_IMAGE_PIXELS = 4096 * 4096
MAX_UPLOAD_BYTES = 20 * 1024 * 1024
DISPLAY_PIXELS = 256       # images and the token map are shown upscaled (nearest) to about this size


class AppInputError(ValueError):
    """Bad input from the page: shown to the user as the message, never as a traceback."""


def code_colours(codebook_size: int) -> np.ndarray:
    """uint8 [K, 3]: code k gets hue frac(k * 0.618...) (golden-ratio steps, so nearby codes differ visibly)."""
    golden = (5 ** 0.5 - 1) / 2
    colours = [colorsys.hsv_to_rgb((k * golden) % 1.0, 0.65 + 0.35 * ((k // 7) % 2), 0.95 - 0.3 * ((k // 3) % 2))
               for k in range(codebook_size)]
    return (np.asarray(colours) * 255).round().astype(np.uint8)


def token_map_image(tokens: np.ndarray, codebook_size: int, cell: int | None = None) -> Image.Image:
    """A token grid [h, w] as an image: one coloured cell x cell square per token (the code's colour); by default
    cell = DISPLAY_PIXELS // max(h, w)."""
    cell = cell or max(1, DISPLAY_PIXELS // max(tokens.shape))
    rgb = code_colours(codebook_size)[tokens]
    return Image.fromarray(rgb).resize((tokens.shape[1] * cell, tokens.shape[0] * cell), Image.Resampling.NEAREST)


def upscale(image: Image.Image, target: int = DISPLAY_PIXELS) -> Image.Image:
    factor = max(1, target // max(image.size))
    return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)


def class_choices(pipeline: LGQPipeline) -> list[str]:
    """The Generate tab's class names: the prior's class names, else the indices as strings."""
    return list(pipeline.id2label.values()) or [str(i) for i in range(pipeline.num_classes)]


def _integer(value: Any, name: str, low: int, high: int | None = None) -> int:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise AppInputError(f"{name} must be a whole number, got {value!r}") from None
    if not number.is_integer() or number < low or (high is not None and number > high):
        bounds = f"between {low} and {high}" if high is not None else f">= {low}"
        raise AppInputError(f"{name} must be a whole number {bounds}, got {value!r}")
    return int(number)


def _real(value: Any, name: str, positive: bool = False) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise AppInputError(f"{name} must be a number, got {value!r}") from None
    if not np.isfinite(number) or number < 0 or (positive and number == 0):
        raise AppInputError(f"{name} must be a {'positive' if positive else 'non-negative'} number, got {value!r}")
    return number


def generate(pipeline: LGQPipeline, class_name: str, num_images: Any, steps: Any, guidance: Any, temperature: Any,
             seed: Any, progress: Callable[[float, str], Any] | None = None, output_dir: str | os.PathLike | None = None):
    """Sample ``num_images`` images of one class. Returns (images, path of tokens.npz, a one-line summary).

    Image i uses ``torch.Generator().manual_seed(seed + i)`` (so image i is the same for any number of images);
    ``progress(fraction, text)`` is called after every sampling step."""
    choices = class_choices(pipeline)
    if class_name not in choices:
        raise AppInputError(f"unknown class {class_name!r}; this pipeline knows: {', '.join(choices[:20])}")
    label = choices.index(class_name)
    count = _integer(num_images, "number of images", 1, MAX_IMAGES)
    num_steps = _integer(steps, "steps", 1, 1000)
    guidance_scale = _real(guidance, "guidance")
    temp = _real(temperature, "temperature", positive=True)
    first_seed = _integer(seed, "seed", 0, 2 ** 63 - MAX_IMAGES)
    generators = [torch.Generator().manual_seed(first_seed + i) for i in range(count)]

    def report(pipe, step_index, timestep, callback_kwargs):
        if progress is not None:
            progress((step_index + 1) / pipe.num_timesteps, f"step {step_index + 1} / {pipe.num_timesteps}")
        return {}

    tokens = pipeline([label] * count, num_inference_steps=num_steps, guidance_scale=guidance_scale, temperature=temp,
                      generator=generators, output_type="latent", callback_on_step_end=report).images
    decoded = pipeline.tokenizer.decode(tokens.to(pipeline.tokenizer.device))
    images = pipeline.image_processor.postprocess(decoded.float(), output_type="pil")
    folder = Path(output_dir or tempfile.mkdtemp(prefix="lgq-app-"))
    folder.mkdir(parents=True, exist_ok=True)
    tokens_file = folder / f"tokens_{class_name}_seed{first_seed}.npz"
    np.savez(tokens_file, tokens=tokens.cpu().numpy(), labels=np.full(count, label, dtype=np.int64))
    steps_text = f"{num_steps} steps, " if pipeline.uses_scheduler else ""
    summary = (f"{count} image(s) of class {class_name!r} (index {label}): {steps_text}guidance {guidance_scale:g}, "
               f"temperature {temp:g}, seeds {first_seed}..{first_seed + count - 1}; token grids "
               f"{tuple(tokens.shape[1:])} in {tokens_file.name}")
    return [upscale(image) for image in images], str(tokens_file), summary


def load_upload(path: str | os.PathLike | None) -> tuple[Image.Image, list[str]]:
    """Open an uploaded file as an RGB image. Returns (image, notes about conversions); AppInputError for a
    missing file, a file that is not an image, or one over MAX_IMAGE_PIXELS."""
    if path is None:
        raise AppInputError("upload an image first")
    path = Path(path)
    if path.stat().st_size > MAX_UPLOAD_BYTES:
        raise AppInputError(f"{path.name} is {path.stat().st_size / 2 ** 20:.1f} MiB; the limit is "
                            f"{MAX_UPLOAD_BYTES // 2 ** 20} MiB")
    try:
        with Image.open(path) as opened:
            width, height = opened.size
            if width * height > MAX_IMAGE_PIXELS:
                raise AppInputError(f"{path.name} is {width} x {height} pixels, too large: the limit is "
                                    f"{MAX_IMAGE_PIXELS:,} pixels (e.g. 4096 x 4096); downscale it first")
            image = opened.copy()
            image.load()
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError) as err:
        if isinstance(err, Image.DecompressionBombError):
            raise AppInputError(f"{path.name} is too large to open safely: {err}") from None
        raise AppInputError(f"{path.name} is not an image PIL can read (PNG, JPEG, WebP, ...)") from None
    notes = []
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba).convert("RGB")
        notes.append("the image had an alpha channel (RGBA): composited over white to RGB")
    elif image.mode in ("L", "I", "I;16", "F", "1"):
        notes.append(f"the image was grey-scale (mode {image.mode}): its grey values were copied to R, G and B")
        image = image.convert("L").convert("RGB")
    elif image.mode != "RGB":
        notes.append(f"the image was in mode {image.mode}: converted to RGB")
        image = image.convert("RGB")
    return image, notes


def tokenize(pipeline: LGQPipeline, path: str | os.PathLike | None):
    """Encode and decode an uploaded image. Returns (input as the tokenizer saw it, reconstruction, token map,
    a summary: PSNR, distinct codes, conversions)."""
    if pipeline.tokenizer is None:
        raise AppInputError("this pipeline has no tokenizer")
    image, notes = load_upload(path)
    height, width = pipeline.image_size
    if image.size != (width, height):
        notes.append(f"resized (shorter side) and centre-cropped from {image.width} x {image.height} to "
                     f"{width} x {height}, the pipeline's image size")
        image = TF.center_crop(TF.resize(image, min(height, width), antialias=True), [height, width])
    tokenizer = pipeline.tokenizer
    pixels = TF.pil_to_tensor(image).unsqueeze(0).float().div(127.5).sub(1.0)  # [1, 3, H, W] in [-1, 1]
    with torch.no_grad():
        indices = tokenizer.encode(pixels.to(tokenizer.device, tokenizer.dtype))
        reconstruction = tokenizer.decode(indices).float().cpu().clamp(-1, 1)
    value = float(psnr(pixels, reconstruction)[0])
    tokens = indices[0].cpu().numpy()
    distinct = int(np.unique(tokens).size)
    shown = pipeline.image_processor.postprocess(reconstruction, output_type="pil")[0]
    summary = (f"PSNR {value:.2f} dB against the input (on [0, 1]); {distinct} distinct codes of "
               f"K = {tokenizer.codebook_size} in a {tokens.shape[0]} x {tokens.shape[1]} token grid")
    if notes:
        summary += "\n\nNote: " + "; ".join(notes) + "."
    return upscale(image), upscale(shown), token_map_image(tokens, tokenizer.codebook_size), summary


def build_app(pipeline: LGQPipeline, title: str = "lgq"):
    """The Gradio Blocks page for ``pipeline``."""
    import gradio as gr  # lazy: the optional [app] extra

    def page_errors(function):
        def wrapped(*args, **kwargs):
            try:
                return function(*args, **kwargs)
            except AppInputError as err:
                raise gr.Error(str(err), print_exception=False) from None
        return wrapped

    @page_errors
    def on_generate(class_name, num_images, steps, guidance, temperature, seed, progress=gr.Progress()):
        progress(0.0, desc="sampling")
        return generate(pipeline, class_name, num_images, steps, guidance, temperature, seed,
                        progress=lambda fraction, text: progress(fraction, desc=text))

    @page_errors
    def on_tokenize(path):
        return tokenize(pipeline, path)

    choices = class_choices(pipeline)
    h, w = pipeline.image_size
    prior = type(pipeline.prior).__name__
    with gr.Blocks(title=title, analytics_enabled=False) as app:
        gr.Markdown(f"## {title}\n{prior} prior + {pipeline.tokenizer.config.quantizer.upper()} tokenizer "
                    f"(K = {pipeline.tokenizer.codebook_size}), {len(choices)} classes, images {h} x {w}, "
                    f"token grid {pipeline.grid_size[0]} x {pipeline.grid_size[1]}")
        with gr.Tab("Generate", id="generate"):
            with gr.Row():
                with gr.Column(scale=1):
                    class_name = gr.Dropdown(choices, value=choices[0], label="class", elem_id="class-name")
                    num_images = gr.Slider(1, MAX_IMAGES, value=8, step=1, label="number of images",
                                           elem_id="num-images")
                    steps = gr.Slider(1, 64, value=12, step=1, label="steps (MaskGIT)", elem_id="steps",
                                      visible=pipeline.uses_scheduler)
                    guidance = gr.Number(value=3.0, label="guidance scale", elem_id="guidance")
                    temperature = gr.Number(value=1.0, label="temperature", elem_id="temperature")
                    seed = gr.Number(value=0, precision=0, label="seed", elem_id="seed")
                    run = gr.Button("Generate", variant="primary", elem_id="generate-button")
                with gr.Column(scale=2):
                    gallery = gr.Gallery(label="samples", columns=4, elem_id="samples", height="auto")
                    tokens_file = gr.File(label="tokens (.npz)", elem_id="tokens-file")
                    generate_summary = gr.Markdown(elem_id="generate-summary")
            run.click(on_generate, [class_name, num_images, steps, guidance, temperature, seed],
                      [gallery, tokens_file, generate_summary])
        with gr.Tab("Tokenize", id="tokenize"):
            with gr.Row():
                with gr.Column(scale=1):
                    upload = gr.File(label="an image (PNG, JPEG, ...)", type="filepath", elem_id="upload")
                    encode = gr.Button("Tokenize", variant="primary", elem_id="tokenize-button")
                with gr.Column(scale=2):
                    with gr.Row():
                        seen = gr.Image(label="input (as the tokenizer sees it)", elem_id="input-image")
                        reconstruction = gr.Image(label="reconstruction", elem_id="reconstruction")
                        token_map = gr.Image(label="token indices", elem_id="token-map")
                    tokenize_summary = gr.Markdown(elem_id="tokenize-summary")
            for trigger in (encode.click, upload.upload):
                trigger(on_tokenize, [upload], [seen, reconstruction, token_map, tokenize_summary])
    return app


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="lgq-app", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", default="outputs/demo/pipeline", help="pipeline folder (or hub id)")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0 for the network)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    parser.add_argument("--share", action="store_true", help="a public gradio.live link (needs internet)")
    parser.add_argument("--compile-prior", action="store_true",
                        help="torch.compile the transformer the prior's decoding steps run (prior.compile_sampling; faster "
                             "after the first call)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        import gradio  # noqa: F401  # lazy: the optional [app] extra
    except ImportError:
        raise SystemExit('lgq-app needs Gradio: pip install -e ".[app]"') from None
    path = Path(args.pipeline)
    if not (path / "model_index.json").is_file() and (path.exists() or str(path).startswith((".", "/", "outputs"))):
        raise SystemExit(f"no pipeline folder at {str(path)!r}: run `make demo` first (it writes "
                         f"outputs/demo/pipeline) or pass --pipeline FOLDER")
    pipeline = LGQPipeline.from_pretrained(args.pipeline).to(args.device)
    if args.compile_prior:
        pipeline.prior.compile_sampling()
    build_app(pipeline, title=f"lgq: {path.name}").launch(server_name=args.host, server_port=args.port,
                                                          share=args.share)


if __name__ == "__main__":  # pragma: no cover
    main()
