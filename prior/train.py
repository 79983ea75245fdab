"""Train a class-conditional token prior (MaskGIT or GPT) on precomputed token grids.

    python -m prior.extract tokenizer=runs/tokenizer_builtin/tokenizer output=runs/tokens_builtin ...
    accelerate launch prior/train.py --config configs/prior/builtin.yaml [key=value ...]
    accelerate launch prior/train.py --config configs/prior/imagenet_maskgit_b.yaml \
        data.tokens=/data/tokens/imagenet_train data.tokenizer=/models/lgq --resume latest

Per optimisation step (the loop itself lives in ``common.training.Trainer.fit``):
  maskgit  L = sum_{masked i} CE(p(t_i | t_unmasked, y), t_i) / #masked, cosine mask ratio
           (prior.maskgit.MaskGITPrior.masking_loss), logged with the accuracy on masked tokens
  gpt      L = (1/L) sum_i CE(p(t_i | t_<i, y), t_i) (prior.gpt.GPTPrior.loss), logged with the accuracy
In both, y is replaced by the null class with probability model.label_dropout (for classifier-free guidance).
K, the grid and the number of classes come from the token data's meta.json; with data.tokenizer the
tokens must carry that tokenizer's fingerprint. Every train.image_log_every steps a class-conditional
sample grid (EMA prior if train.ema_decay > 0, decoded by data.tokenizer when given) goes to
<output_dir>/images/ and the tracker. At the end the EMA (or raw) prior is exported with save_pretrained
to <output_dir>/prior (load with MaskGITPrior / GPTPrior.from_pretrained).
On SIGTERM / SIGUSR1 the run checkpoints after the current step and exits with code 75 (preempted: requeue
with --resume latest; common/training.py).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from torchvision.utils import make_grid

from common.cli import load_run_config
from common.hub import CardInfo, training_rows
from common.training import Trainer, build_optimizer
from prior.config import PriorModelConfig, PriorRunConfig, resolve_data_shape
from prior.gpt import GPTPrior
from prior.maskgit import MaskGITPrior
from prior.tokens import TokenDataset, tokenizer_fingerprint
from tokenizer.model import LGQTokenizer


class PriorTrainingLoss(nn.Module):
    """The prior seen by the training loop: forward(tokens, labels) = prior.loss(tokens, labels) -> (loss, logs).

    Routing the loss through ``forward`` lets DDP see (and synchronise) the call; checkpoints hold
    ``prior.*`` weights and ``save_pretrained`` exports the bare prior.
    """

    def __init__(self, prior: nn.Module, label_smoothing: float = 0.0):
        super().__init__()
        self.prior = prior
        self.label_smoothing = float(label_smoothing)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor):
        return self.prior.loss(tokens, labels, label_smoothing=self.label_smoothing)

    def save_pretrained(self, *args, **kwargs):
        return self.prior.save_pretrained(*args, **kwargs)


def build_prior(model_cfg: PriorModelConfig, codebook_size: int, grid_size: tuple[int, int], num_classes: int,
                class_names: list[str] | None = None):
    """MaskGITPrior or GPTPrior of the configured size over K = codebook_size, grid h x w, C classes (named
    ``class_names`` when the token data records them: the pipeline's ``id2label``)."""
    common = dict(codebook_size=codebook_size, num_classes=num_classes, grid_size=tuple(grid_size),
                  class_names=list(class_names) if class_names and len(class_names) == num_classes else None,
                  hidden_size=model_cfg.hidden_size, num_layers=model_cfg.num_layers, num_heads=model_cfg.num_heads,
                  mlp_ratio=model_cfg.mlp_ratio, dropout=model_cfg.dropout, label_dropout=model_cfg.label_dropout)
    if model_cfg.prior_type == "maskgit":
        return MaskGITPrior(**common)

    return GPTPrior(num_kv_heads=model_cfg.num_kv_heads, **common)


def load_token_data(cfg: PriorRunConfig):
    """(TokenDataset, {K, grid, C}, tokenizer or None): the tokens checked against data.tokenizer and model.*."""
    tokenizer, expected_hash = None, None
    if cfg.data.tokenizer:
        if not Path(cfg.data.tokenizer).exists():
            raise FileNotFoundError(f"data.tokenizer: {cfg.data.tokenizer} does not exist")
        tokenizer = LGQTokenizer.from_pretrained(cfg.data.tokenizer).eval()
        expected_hash = tokenizer_fingerprint(tokenizer)
    paths = cfg.data.token_paths
    try:
        dataset = TokenDataset(paths, expected_tokenizer_hash=expected_hash, use_augmentations=cfg.data.use_augmentations)
    except ValueError as err:
        if expected_hash is not None and "tokenizer" in str(err):
            raise ValueError(f"data.tokens {paths} do not come from data.tokenizer={cfg.data.tokenizer}: {err}") from err
        raise
    shape = resolve_data_shape(cfg.model, dataset.meta, f"{paths[0]}" if len(paths) == 1 else f"{paths}")
    if tokenizer is not None and tokenizer.codebook_size != shape["codebook_size"]:
        raise ValueError(f"data.tokenizer has K={tokenizer.codebook_size} but the tokens have "
                         f"K={shape['codebook_size']}")
    return dataset, shape, tokenizer


def sample_labels(num_images: int, num_classes: int, given: Sequence[int] | None) -> list[int]:
    """The given labels, or y_i = floor(i C / n), i = 0..n-1 (evenly spread over the classes)."""
    if given is not None:
        return list(given)
    return [i * num_classes // num_images for i in range(num_images)]


def token_images(tokens: torch.Tensor, codebook_size: int, min_size: int = 64) -> torch.Tensor:
    """Token ids [B, h, w] as grey images [B, 3, H, W] in [-1, 1]: x = 2 id / (K - 1) - 1, nearest-upscaled."""
    grey = tokens.float().unsqueeze(1) / max(1, codebook_size - 1) * 2 - 1
    scale = max(1, -(-min_size // max(tokens.shape[1:])))
    return grey.repeat_interleave(scale, 2).repeat_interleave(scale, 3).repeat(1, 3, 1, 1)


def main(argv: Sequence[str] | None = None) -> Trainer | None:
    """Run training; returns the Trainer (``.history`` holds the logged values, ``.output_dir`` the run), or None
    after --print-config."""
    cfg, print_only = load_run_config(PriorRunConfig, argv, __doc__.split("\n\n")[0], "prior/train.py")
    if print_only:
        return None
    train_set, shape, tokenizer = load_token_data(cfg)  # before the Trainer: data errors leave no run directory
    trainer = Trainer(cfg.train, run_config=cfg)
    accelerator = trainer.accelerator

    # --- build: prior (behind its loss), optimizer, data ------------------------------------------------
    prior = build_prior(cfg.model, **shape, class_names=train_set.class_names)
    if cfg.model.output_bias_init == "unigram":  # a resumed run loads its trained bias over this
        prior.init_output_bias(train_set.code_counts())
    model = PriorTrainingLoss(prior, cfg.model.label_smoothing)
    loader = torch.utils.data.DataLoader(train_set, batch_size=cfg.train.batch_size, shuffle=True, drop_last=True,
                                         num_workers=cfg.train.num_workers,
                                         persistent_workers=False, pin_memory=torch.cuda.is_available())
    model = trainer.setup({"model": model}, {"model": build_optimizer(model, cfg.train)}, loader, ema_model="model")[0]
    if tokenizer is not None:
        tokenizer.to(trainer.device)
    h, w = shape["grid_size"]
    trainer.print(f"{cfg.model.prior_type} prior: {sum(p.numel() for p in prior.parameters()) / 1e6:.2f}M parameters, "
                  f"K={shape['codebook_size']}, grid {h}x{w}, {shape['num_classes']} classes, {len(train_set)} token "
                  f"grids, {accelerator.num_processes} process(es), global batch {trainer.images_per_step}")

    # --- one micro-batch ---------------------------------------------------------------------------------
    def training_step(batch, step: int) -> dict[str, torch.Tensor]:
        tokens, labels = batch
        with accelerator.autocast():
            loss, logs = model(tokens, labels)
        trainer.backward(loss)
        return logs

    # --- sample grid ---------------------------------------------------------------------------------------
    labels = sample_labels(cfg.sample.num_images, shape["num_classes"], cfg.sample.class_labels)

    @torch.no_grad()
    def on_image_log(step: int) -> dict[str, object]:
        sampler = (trainer.ema.module if trainer.ema is not None else trainer.unwrap("model")).prior
        was_training = sampler.training
        sampler.eval()
        generator = torch.Generator(device=trainer.device).manual_seed(cfg.sample.seed)
        options = dict(guidance_scale=cfg.sample.guidance_scale, temperature=cfg.sample.temperature,
                       generator=generator)
        if cfg.model.prior_type == "maskgit":
            options["num_inference_steps"] = cfg.sample.steps
        else:
            options.update(top_k=cfg.sample.top_k, top_p=cfg.sample.top_p)
        with accelerator.autocast():
            tokens = sampler.generate(labels, **options)
        sampler.train(was_training)
        images = tokenizer.decode(tokens) if tokenizer is not None else token_images(tokens, shape["codebook_size"])
        grid = make_grid(images.float().clamp(-1, 1).cpu(), nrow=min(8, len(labels)), padding=2, pad_value=1.0)
        return {"samples": grid}

    # --- run, export ---------------------------------------------------------------------------------------
    logs = trainer.fit(training_step, on_image_log=on_image_log)
    trainer.finish("prior", logs, f"{cfg.model.prior_type} prior",
                   card=prior_card(cfg, prior, shape, trainer, train_set, logs))
    return trainer


def prior_card(cfg: PriorRunConfig, prior: nn.Module, shape: dict, trainer: Trainer, train_set, logs):
    """The export's model card: prior type, K, grid, classes, token data, steps, the last training metrics."""
    h, w = shape["grid_size"]
    maskgit = cfg.model.prior_type == "maskgit"
    names = train_set.class_names or []
    accuracy = "masked_accuracy" if maskgit else "accuracy"
    metrics = [(label, float(logs[key])) for label, key in (("training loss", "loss"), (f"training {accuracy}", accuracy))
               if key in logs]
    backbone = "bidirectional MaskGIT transformer (transformers BertModel)" if maskgit else \
        "autoregressive GPT (transformers LlamaForCausalLM)"
    classes = f"{shape['num_classes']}" + (f": {', '.join(names[:20])}{', ...' if len(names) > 20 else ''}" if names else "")
    cls = type(prior)
    steps = "num_inference_steps=12, " if maskgit else ""
    usage = (f'from {cls.__module__} import {cls.__name__}\n'
             f'from pipelines.assemble import build_pipeline\n\n'
             f'prior = {cls.__name__}.from_pretrained("<this folder or hub id>").eval()\n'
             f'tokens = prior.generate([0, 1])                 # int64 [2, {h}, {w}] token grids\n'
             f'pipe = build_pipeline("<tokenizer folder>", "<this folder>")   # or python -m pipelines.assemble\n'
             f'images = pipe([0, 1], {steps}guidance_scale=3.0).images')
    return CardInfo(
        kind="prior",
        title=f"{'MaskGIT' if maskgit else 'GPT'} token prior, K = {shape['codebook_size']}, {shape['num_classes']} classes",
        description=(f"A class-conditional {backbone} over {h} x {w} grids of tokens from an lgq tokenizer (codebook "
                     f"size {shape['codebook_size']}); classifier-free guidance through a null class (label dropout "
                     f"{cfg.model.label_dropout}). Pair it with its tokenizer in an LGQPipeline."),
        facts=[("prior", cls.__name__), ("codebook size K", shape["codebook_size"]), ("token grid", f"{h} x {w}"),
               ("classes", classes),
               ("size", f"{cfg.model.num_layers} layers x {cfg.model.hidden_size} hidden, {cfg.model.num_heads} heads, "
                        f"{sum(p.numel() for p in prior.parameters()) / 1e6:.2f}M parameters"),
               ("tokenizer fingerprint", train_set.tokenizer_hash)],
        training=[("data", f"token grids {cfg.data.token_paths} ({len(train_set)} grids)"),
                  *([("output bias at the start", "add-one smoothed log frequencies of the training tokens "
                                                  "(model.output_bias_init=unigram)")]
                    if cfg.model.output_bias_init == "unigram" else []),
                  *training_rows(cfg, trainer)],
        metrics=metrics,
        metrics_protocol=(f"the last logged training batch at step {trainer.step} (cross-entropy "
                          f"{'on the masked tokens only' if maskgit else 'over all positions'}). No generation FID/IS "
                          f"was computed here: assemble a pipeline and run `eval/gen_fid.py`."),
        usage=usage, tags=[cfg.model.prior_type, "class-conditional"],
    )


if __name__ == "__main__":
    main(sys.argv[1:])
