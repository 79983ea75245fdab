"""`python train_check_ranks_in_sync.py tokenizer|prior <train args>`: run that stage's train script, then
check (just before the process group is torn down) that every trained module (tokenizer: generator,
discriminator, EMA; prior: prior, EMA) holds bit-identical weights on all ranks — DDP for the main model,
the Trainer's gradient averaging for the discriminator (``without_ddp``), identical data-driven
quantizer init."""
import importlib
import sys

import torch

from common.training import Trainer

stage = sys.argv[1]
if stage not in ("tokenizer", "prior"):
    raise SystemExit(f"first argument must be tokenizer or prior, got {stage!r}")
main = importlib.import_module(f"{stage}.train").main

original_end = Trainer.end


def check_then_end(trainer):
    modules = {name: trainer.unwrap(name) for name in trainer.models}
    if trainer.ema is not None:
        modules["ema"] = trainer.ema.module
    for name, module in modules.items():
        different = []
        for key, tensor in module.state_dict().items():
            gathered = trainer.accelerator.gather(tensor.detach().float().reshape(1, -1))
            if not all(torch.equal(gathered[0], other) for other in gathered[1:]):
                different.append(key)
        if different:
            raise SystemExit(f"{name} differs across ranks: {different}")
    trainer.print(f"RANKS IN SYNC: {sorted(modules)}")
    original_end(trainer)


Trainer.end = check_then_end
main(sys.argv[2:])
