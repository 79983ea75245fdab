"""Train an image tokenizer (LGQ / VQ / FSQ / SimVQ / LFQ under the same VQGAN backbone).

    accelerate launch tokenizer/train.py --config configs/tokenizer/builtin.yaml [key=value ...]
    accelerate launch tokenizer/train.py --config configs/tokenizer/imagenet_base.yaml \
        --config configs/tokenizer/imagenet_fsq.yaml data.root=/data/imagenet --resume latest

Per optimisation step (the loop itself lives in ``common.training.Trainer.fit``):
  generator step     L_G = L1 (+L2) + LPIPS + w_gan * lambda * GAN + quantizer loss   (tokenizer.losses)
  discriminator step hinge loss on (images, reconstructions.detach()), from loss.gan_start_step on
Logged every train.log_every steps: every loss term, quantizer statistics (tau, ...), LR, images/s and
codebook statistics (active codes / perplexity, common.metrics.codebook_statistics) over a rolling window
of the last eval.codebook_window batches of hard indices from all processes. Every
train.image_log_every steps: validation PSNR + codebook statistics on eval.num_val_images images and a
PNG grid (top: originals, bottom: reconstructions) in <output_dir>/images/ and the tracker.
At the end the EMA weights (or raw weights if train.ema_decay=0) are exported with save_pretrained
to <output_dir>/tokenizer (load with LGQTokenizer.from_pretrained).
On SIGTERM / SIGUSR1 the run checkpoints after the current step and exits with code 75 (preempted: requeue
with --resume latest; common/training.py).
"""
from __future__ import annotations

import collections
import sys
from typing import Sequence

import torch

from common.cli import load_run_config
from common.hub import CardInfo, training_rows
from common.metrics import codebook_statistics, image_grid, mean_psnr
from common.data import build_image_dataset, describe_size, first_items, is_stream
from common.training import Trainer, build_optimizer, init_quantizer_from_data
from tokenizer.config import TokenizerRunConfig
from tokenizer.losses import TokenizerLoss
from tokenizer.model import build_tokenizer


def main(argv: Sequence[str] | None = None) -> Trainer | None:
    """Run training; returns the Trainer (``.history`` holds the logged values, ``.output_dir`` the run), or None
    after --print-config."""
    cfg, print_only = load_run_config(TokenizerRunConfig, argv, __doc__.split("\n\n")[0], "tokenizer/train.py")
    if print_only:
        return None
    trainer = Trainer(cfg.train, run_config=cfg)
    accelerator = trainer.accelerator

    # --- build: model, loss (LPIPS + discriminator), optimizers, data --------------------------------------
    model = build_tokenizer(cfg.model)
    loss_fn = TokenizerLoss.from_config(cfg.loss)
    models, optimizers = {"model": model}, {"model": build_optimizer(model, cfg.train)}
    discriminator = loss_fn.discriminator
    if discriminator is not None:
        models["discriminator"] = discriminator
        optimizers["discriminator"] = build_optimizer(discriminator, cfg.train)
    train_set = build_image_dataset(cfg.data, "train")
    loader = torch.utils.data.DataLoader(train_set, batch_size=cfg.train.batch_size, shuffle=not is_stream(train_set),
                                         drop_last=True,
                                         num_workers=cfg.train.num_workers,
                                         persistent_workers=False, pin_memory=torch.cuda.is_available())
    prepared = trainer.setup(models, optimizers, loader, ema_model="model",
                             without_ddp=[name for name in models if name == "discriminator"])  # none when GAN off
    model = prepared[0]
    tokenizer = trainer.unwrap("model")
    loss_fn.to(trainer.device)  # LPIPS; the discriminator is already placed (and shared)
    trainer.print(f"tokenizer: {sum(p.numel() for p in tokenizer.parameters()) / 1e6:.2f}M parameters, quantizer "
                  f"{cfg.model.quantizer} K={tokenizer.codebook_size}, {describe_size(train_set)} for training, "
                  f"{accelerator.num_processes} process(es), global batch {trainer.images_per_step}")
    if loss_fn.lpips is not None:  # the run's config.yaml records loss.lpips_uniform_heads as well
        trainer.print(f"perceptual loss: {loss_fn.lpips.variant}, weight {cfg.loss.perceptual_weight}")
    init_quantizer_from_data(trainer, "model", num_batches=cfg.eval.quantizer_init_batches)

    # --- one micro-batch: generator step, then discriminator step ----------------------------------------
    recent_counts: collections.deque[torch.Tensor] = collections.deque(maxlen=cfg.eval.codebook_window)

    def training_step(batch, step: int) -> dict[str, torch.Tensor]:
        images = batch[0]
        if discriminator is not None:
            discriminator.requires_grad_(False)  # the GAN term trains the generator only
        with accelerator.autocast():
            output = model(images)
            quantizer_output = output.quantizer_output
            loss, logs = loss_fn.generator_loss(images, output.reconstruction, quantizer_output.loss, step,
                                                last_layer=tokenizer.last_layer_weight())
        trainer.backward(loss)
        logs.update({f"quantizer/{k}": v for k, v in quantizer_output.stats.items()})
        recent_counts.append(torch.bincount(quantizer_output.indices.reshape(-1), minlength=tokenizer.codebook_size))

        if loss_fn.gan_active(step):
            discriminator.requires_grad_(True)
            with accelerator.autocast():
                disc_loss, disc_logs = loss_fn.discriminator_loss(images, output.reconstruction, step)
            trainer.backward(disc_loss)
            logs.update(disc_logs)
        return logs

    # --- logging hooks ----------------------------------------------------------------------------------
    tokens_per_image = (cfg.data.image_size // tokenizer.downsample_factor) ** 2

    def on_log(step: int) -> dict[str, float]:
        counts = accelerator.reduce(torch.stack(list(recent_counts)).sum(0), reduction="sum")
        stats = codebook_statistics(counts, tokens_per_image)
        norm_stats = {f"pre_norm/{k}": float(v) for k, v in tokenizer.pre_quantizer_norm.affine_stats().items()}
        return {**{f"codebook/{k}": stats[k] for k in ("active_codes", "utilisation", "perplexity", "bits_per_token")},
                **norm_stats}

    val_images = None
    if cfg.eval.num_val_images:
        val_set = build_image_dataset(cfg.data, "val")
        val_images = torch.stack([image for image, _ in first_items(val_set, cfg.eval.num_val_images)]).to(trainer.device)

    @torch.no_grad()
    def on_image_log(step: int) -> dict[str, object]:
        if val_images is None:
            return {}
        tokenizer.eval()
        with accelerator.autocast():
            output = tokenizer(val_images)
        tokenizer.train()
        reconstruction = output.reconstruction.float().clamp(-1, 1)
        stats = codebook_statistics(torch.bincount(output.quantizer_output.indices.reshape(-1),
                                                   minlength=tokenizer.codebook_size), tokens_per_image)
        return {"val/psnr": mean_psnr(val_images, reconstruction, max_db=100.0),
                "val/active_codes": stats["active_codes"], "val/perplexity": stats["perplexity"],
                "val/reconstructions": image_grid(val_images, reconstruction)}

    # --- run, export -----------------------------------------------------------------------------------
    logs = trainer.fit(training_step, on_log=on_log, on_image_log=on_image_log)
    trainer.finish("tokenizer", logs, card=tokenizer_card(cfg, tokenizer, trainer, describe_size(train_set)))
    return trainer


def describe_data(data, size: str) -> str:
    """One line naming the training data of a run: set, location, resolution, size ("N images", see describe_size)."""
    where = f" at {data.root}" if data.root else f" at {data.shards}" if data.shards else ""
    return f"{data.name}{where}, train split, {data.image_size} px, {size}"


TOKENIZER_USAGE = """from tokenizer.model import LGQTokenizer

tokenizer = LGQTokenizer.from_pretrained("<this folder or hub id>").eval()
indices = tokenizer.encode(images)        # images: float [B, 3, H, W] in [-1, 1] -> int64 [B, h, w]
reconstruction = tokenizer.decode(indices)"""


def tokenizer_card(cfg: TokenizerRunConfig, tokenizer, trainer: Trainer, train_size: str):
    """The export's model card: quantizer, K, grid, training data and steps, the last validation metrics."""
    f = int(tokenizer.downsample_factor)
    grid = cfg.data.image_size // f
    validation = [(step, logs) for step, logs in trainer.image_log_history if "val/psnr" in logs]
    metrics, protocol = [], ("Reconstruction metrics of the validation images appear here when eval.num_val_images "
                             "> 0 and train.image_log_every > 0; for rFID, SSIM and LPIPS run "
                             "`python -m eval.reconstruction --tokenizer <this folder> ...`.")
    if validation:
        step, logs = validation[-1]
        metrics = [("PSNR (dB)", float(logs["val/psnr"])), ("active codes", float(logs["val/active_codes"])),
                   ("code perplexity", float(logs["val/perplexity"]))]
        protocol = (f"measured during training at step {step} with the training weights (not the EMA) on the first "
                    f"{cfg.eval.num_val_images} images of the '{cfg.data.name}' validation split at "
                    f"{cfg.data.image_size} px; PSNR per image on [0, 1], averaged; active codes and perplexity "
                    f"exp(H) from the histogram of those images' hard indices (common/metrics.py). rFID, SSIM, LPIPS: "
                    f"`python -m eval.reconstruction --tokenizer <this folder> ...`.")
    options = ", ".join(f"{k}={v}" for k, v in sorted(cfg.model.quantizer_options.items())) or "defaults"
    name = cfg.model.quantizer.upper()
    return CardInfo(
        kind="tokenizer",
        title=f"{name} image tokenizer, K = {tokenizer.codebook_size}",
        description=(f"A VQGAN-style convolutional encoder/decoder with a {name} quantizer: it maps a "
                     f"{cfg.data.image_size} x {cfg.data.image_size} RGB image to a {grid} x {grid} grid of discrete "
                     f"tokens in [0, {tokenizer.codebook_size}) and decodes token grids back to images."),
        facts=[("quantizer", f"{cfg.model.quantizer} ({options})"), ("codebook size K", tokenizer.codebook_size),
               ("token grid", f"{grid} x {grid} at {cfg.data.image_size} px (downsampling {f})"),
               ("latent dim", cfg.model.latent_dim), ("pre-quantizer norm", cfg.model.pre_quantizer_norm),
               *([("temperature schedule", f"{tokenizer.quantizer.schedule_description()} (tau at the last step "
                                           f"{float(tokenizer.quantizer.tau):.4g})")]
                 if hasattr(tokenizer.quantizer, "schedule_description") else []),
               ("parameters", f"{sum(p.numel() for p in tokenizer.parameters()) / 1e6:.2f}M")],
        training=[("data", describe_data(cfg.data, train_size)), *training_rows(cfg, trainer)],
        metrics=metrics, metrics_protocol=protocol, usage=TOKENIZER_USAGE, tags=[cfg.model.quantizer],
    )


if __name__ == "__main__":
    main(sys.argv[1:])
