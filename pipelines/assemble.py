"""Assemble training exports into an `LGQPipeline` folder.

    python -m pipelines.assemble --tokenizer OUT/tokenizer --prior OUT/prior --output OUT/pipeline

``--tokenizer`` and ``--prior`` are folders written by ``save_pretrained`` (the training exports).
The prior type (MaskGIT or GPT) is read from the ``_class_name`` of the prior's ``config.json``.
MaskGIT priors get a ``MaskGITScheduler`` (``--scheduler FOLDER`` to reuse a saved one, otherwise
built from ``--mask-schedule`` / ``--choice-temperature`` and the prior's codebook size and mask id);
GPT priors get none. The result is saved with safetensors and, unless ``--no-verify``, reloaded
once to check that it loads offline.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Sequence

from prior.scheduler import MASK_SCHEDULES, MaskGITScheduler

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
    import importlib

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
    from pipelines.pipeline_lgq import LGQPipeline, is_maskgit_prior
    from tokenizer.model import LGQTokenizer

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
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> Path:
    args = parse_args(argv)
    pipeline = build_pipeline(args.tokenizer, args.prior, args.scheduler, args.mask_schedule, args.choice_temperature)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    pipeline.save_pretrained(output, safe_serialization=True)
    if not args.no_verify:
        from pipelines.pipeline_lgq import LGQPipeline

        LGQPipeline.from_pretrained(output)
    h, w = pipeline.image_size
    print(f"LGQPipeline written to {output}: prior {type(pipeline.prior).__name__} "
          f"({pipeline.num_classes} classes, token grid {pipeline.grid_size}), tokenizer K={pipeline.tokenizer.codebook_size}, "
          f"images {h}x{w}, scheduler {type(pipeline.scheduler).__name__ if pipeline.scheduler is not None else 'none'}")
    return output


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
