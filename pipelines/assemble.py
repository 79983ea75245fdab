"""Assemble training exports into an `LGQPipeline` folder.

    python -m pipelines.assemble --tokenizer OUT/tokenizer --prior OUT/prior --output OUT/pipeline

``--tokenizer`` and ``--prior`` are folders written by ``save_pretrained`` (the training exports).
The prior type (MaskGIT or GPT) is read from the ``_class_name`` of the prior's ``config.json``.
MaskGIT priors get a ``MaskGITScheduler`` (``--scheduler FOLDER`` to reuse a saved one, otherwise
built from ``--mask-schedule`` / ``--choice-temperature`` and the prior's codebook size and mask id);
GPT priors get an ``AutoregressiveScheduler``. The result is saved with safetensors, with a model card
(README.md, summarising the components' own cards, which are copied into their sub-folders) and, unless
``--no-verify``, reloaded once to check that it loads offline; ``--push-to-hub [--hub-model-id ID]`` uploads it.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Sequence

from common.hub import CARD_FILE, CardInfo, push_folder_to_hub, read_card_metadata, write_model_card
from pipelines.pipeline_lgq import LGQPipeline
from prior.sampling import is_maskgit_prior
from prior.scheduler import MASK_SCHEDULES, MaskGITScheduler
from tokenizer.model import LGQTokenizer

# _class_name in the prior's config.json -> "module:Class"
PRIOR_CLASSES = {
    "MaskGITPrior": "prior.maskgit:MaskGITPrior",
    "GPTPrior": "prior.gpt:GPTPrior",
}


def _read_config(folder: str | os.PathLike, what: str, config_name: str = "config.json") -> dict:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{what} folder {str(folder)!r} does not exist (expected a save_pretrained export)")
    config_file = folder / config_name
    if not config_file.is_file():
        raise FileNotFoundError(f"{what} folder {str(folder)!r} has no {config_name}: not a save_pretrained export")
    with open(config_file) as handle:
        return json.load(handle)


def prior_class_for(prior_path: str | os.PathLike):
    """The prior class named by ``_class_name`` in ``prior_path/config.json`` (MaskGITPrior or GPTPrior)."""
    class_name = _read_config(prior_path, "prior").get("_class_name")
    if class_name not in PRIOR_CLASSES:
        raise ValueError(f"{str(prior_path)!r}/config.json names prior class {class_name!r}; "
                         f"expected one of {sorted(PRIOR_CLASSES)}")
    module_name, attr = PRIOR_CLASSES[class_name].split(":")
    return getattr(importlib.import_module(module_name), attr)


def build_pipeline(tokenizer_path: str | os.PathLike, prior_path: str | os.PathLike,
                   scheduler_path: str | os.PathLike | None = None, mask_schedule: str = "cosine",
                   choice_temperature: float = 4.5):
    """Load the tokenizer and prior exports and combine them into an `LGQPipeline` (eval mode, fp32)."""
    tokenizer_config = _read_config(tokenizer_path, "tokenizer")
    if tokenizer_config.get("_class_name") != "LGQTokenizer":
        raise ValueError(f"{str(tokenizer_path)!r}/config.json describes {tokenizer_config.get('_class_name')!r}, "
                         f"not an LGQTokenizer export")
    prior_cls = prior_class_for(prior_path)
    tokenizer = LGQTokenizer.from_pretrained(os.fspath(tokenizer_path))
    prior = prior_cls.from_pretrained(os.fspath(prior_path))
    scheduler = None
    if is_maskgit_prior(prior):
        if scheduler_path is not None:
            _read_config(scheduler_path, "scheduler", MaskGITScheduler.config_name)
            scheduler = MaskGITScheduler.from_pretrained(os.fspath(scheduler_path))
        else:
            if mask_schedule not in MASK_SCHEDULES:
                raise ValueError(f"mask_schedule must be one of {MASK_SCHEDULES}, got {mask_schedule!r}")
            scheduler = MaskGITScheduler(codebook_size=int(prior.codebook_size),
                                         mask_token_id=int(getattr(prior, "mask_token_id", prior.codebook_size)),
                                         mask_schedule=mask_schedule, choice_temperature=float(choice_temperature))
    elif scheduler_path is not None:
        raise ValueError(f"--scheduler was given but {type(prior).__name__} does not use a scheduler")
    return LGQPipeline(tokenizer=tokenizer, prior=prior, scheduler=scheduler)


PIPELINE_USAGE = """import torch
from pipelines import LGQPipeline

pipe = LGQPipeline.from_pretrained("<this folder or hub id>")
labels = pipe.get_label_ids([...]) if pipe.id2label else [0, 1]    # class names -> indices
images = pipe(labels, {steps}guidance_scale=3.0, generator=torch.Generator().manual_seed(0)).images"""


def pipeline_card(pipeline, tokenizer_path: str | os.PathLike, prior_path: str | os.PathLike):
    """The pipeline's model card: its components (from their configs) and their training and metrics (from the
    components' own model cards, when the exports have them)."""
    tokenizer_card, prior_card = read_card_metadata(tokenizer_path), read_card_metadata(prior_path)
    tokenizer, prior, scheduler = pipeline.tokenizer, pipeline.prior, pipeline.scheduler
    h, w = pipeline.grid_size
    image_h, image_w = pipeline.image_size
    names = list(pipeline.id2label.values())
    facts = [("tokenizer", f"LGQTokenizer, quantizer {tokenizer.config.quantizer}, K = {tokenizer.codebook_size}"),
             ("prior", type(prior).__name__), ("scheduler", type(scheduler).__name__),
             ("token grid", f"{h} x {w} -> images {image_h} x {image_w}"),
             ("classes", f"{pipeline.num_classes}" + (f": {', '.join(names[:20])}{', ...' if len(names) > 20 else ''}"
                                                      if names else " (no class names recorded)"))]
    training, metrics, protocols = [], [], []
    for part, card in (("tokenizer", tokenizer_card), ("prior", prior_card)):
        if card is None:
            protocols.append(f"the {part} export had no model card, so its training and metrics are unknown here")
            continue
        training += [(f"{part}: {name}", value) for name, value in card.get("training", [])]
        metrics += [(f"{part}: {name}", value) for name, value in card.get("metrics", [])]
        if card.get("metrics"):
            protocols.append(f"{part}: {card.get('metrics_protocol', '')}")
    protocols.append("generation metrics (gFID, IS): `eval/gen_fid.py --pipeline <this folder>`")
    return CardInfo(
        kind="pipeline",
        title=f"LGQPipeline: {type(prior).__name__} + {tokenizer.config.quantizer.upper()} tokenizer (K = "
              f"{tokenizer.codebook_size})",
        description=("A diffusers pipeline for class-conditional image generation: the prior samples a grid of "
                     "discrete tokens for each class label (the scheduler steps, classifier-free guidance), the "
                     "tokenizer's decoder turns the tokens into an image."),
        facts=facts, training=training, metrics=metrics, metrics_protocol="; ".join(protocols),
        usage=PIPELINE_USAGE.replace("{steps}", "num_inference_steps=12, " if pipeline.uses_scheduler else ""),
        tags=["class-conditional", "image-generation", "diffusers-pipeline"],
    )


def save_pipeline(pipeline, output: str | os.PathLike, tokenizer_path: str | os.PathLike,
                  prior_path: str | os.PathLike) -> Path:
    """save_pretrained (safetensors) plus model cards: the pipeline's README.md and its components' cards."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    pipeline.save_pretrained(output, safe_serialization=True)
    for part, source in (("tokenizer", tokenizer_path), ("prior", prior_path)):
        card = Path(source) / CARD_FILE
        if card.is_file():
            shutil.copyfile(card, output / part / CARD_FILE)
    write_model_card(output, pipeline_card(pipeline, tokenizer_path, prior_path))
    return output


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pipelines.assemble", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", required=True, help="LGQTokenizer export folder (save_pretrained)")
    parser.add_argument("--prior", required=True, help="MaskGITPrior / GPTPrior export folder (save_pretrained)")
    parser.add_argument("--output", required=True, help="pipeline folder to write")
    parser.add_argument("--scheduler", default=None, help="saved MaskGITScheduler folder (MaskGIT priors only)")
    parser.add_argument("--mask-schedule", default="cosine", choices=MASK_SCHEDULES)
    parser.add_argument("--choice-temperature", type=float, default=4.5,
                        help="scale of the annealed Gumbel noise in MaskGIT's confidence")
    parser.add_argument("--no-verify", action="store_true", help="skip reloading the saved pipeline")
    parser.add_argument("--push-to-hub", action="store_true", help="upload the pipeline folder with huggingface_hub")
    parser.add_argument("--hub-model-id", default=None, help="'user/name' or 'name' (default: the output folder name)")
    parser.add_argument("--hub-private", action="store_true", help="create the Hub repo as private")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> Path:
    args = parse_args(argv)
    pipeline = build_pipeline(args.tokenizer, args.prior, args.scheduler, args.mask_schedule, args.choice_temperature)
    output = save_pipeline(pipeline, args.output, args.tokenizer, args.prior)
    if not args.no_verify:
        LGQPipeline.from_pretrained(output)
    h, w = pipeline.image_size
    print(f"LGQPipeline written to {output}: prior {type(pipeline.prior).__name__} "
          f"({pipeline.num_classes} classes, token grid {pipeline.grid_size}), tokenizer K={pipeline.tokenizer.codebook_size}, "
          f"images {h}x{w}, scheduler {type(pipeline.scheduler).__name__ if pipeline.scheduler is not None else 'none'}")
    if args.push_to_hub:
        url = push_folder_to_hub(output, args.hub_model_id or output.resolve().name, private=args.hub_private)
        print(f"pushed {output} to the Hub: {url}")
    return output


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
