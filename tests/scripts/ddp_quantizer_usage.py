"""Quantizer batch statistics under real 2-process DDP (launched by tests/test_quantizer_ddp.py).

Each rank quantizes its half of a fixed batch z [4, C, 4, 4] with an identically seeded LGQ
quantizer. Rank 0 writes to ``argv[1]`` (torch.save):
  usage         u [K] over the global batch (``soft_usage``: all-reduced sum of p / global count)
  loss_usage    L_usage = K sum_k u_k^2 from the forward stats
  grad_usage    d L_usage / d centres, rank grads all-reduced and averaged as DDP would
  grad_total    d (weighted total loss) / d centres, averaged likewise
  grad_input    d (total loss) / d z for the whole batch (both halves gathered, unscaled)
  lfq_<mode>    for LFQ with entropy_mode "exact" and "factorized": the batch (codebook)
                entropy H(pbar) over the global batch and d L / d params (averaged like DDP)
  eval          rank 0 alone runs eval-mode forwards of LGQ / LFQ / IBQ / VQ (rank 1 runs none, as in
                an extraction whose chunks do not divide evenly): their loss and stats, which must be
                those of the local batch, and the run must not hang
The test compares these with a single process on the concatenated batch (the eval values: on rank 0's half).
"""
import os
import sys

import torch
import torch.distributed as dist
from accelerate import PartialState

from common.training import end_process_group
from tokenizer.quantizers.lfq import LFQuantizer
from tokenizer.quantizers.lgq import LGQuantizer

DIM, K, TAU = 6, 11, 0.5
LFQ_K = 16


def fixed_batch() -> torch.Tensor:
    return torch.randn(4, DIM, 4, 4, generator=torch.Generator().manual_seed(0))


def make_quantizer(**weights) -> LGQuantizer:
    torch.manual_seed(1)
    return LGQuantizer(DIM, K, tau_start=TAU, tau_end=TAU, chunk_size=5, **weights)


def make_lfq(mode: str) -> LFQuantizer:
    """Soft (T = 0.25) LFQ whose loss is only the entropy term, so the batch entropy drives the grads."""
    torch.manual_seed(2)
    return LFQuantizer(DIM, LFQ_K, temperature=0.25, entropy_weight=1.0, commitment_weight=0.0,
                       entropy_mode=mode, chunk_size=3)


def lfq_statistics(quantizer: LFQuantizer, z: torch.Tensor, world: int = 1) -> dict:
    """Global batch entropy and parameter gradients (DDP-averaged when world > 1)."""
    out = quantizer(z)
    out.loss.backward()
    grads = {name: (average_grad(p.grad, world) if world > 1 else p.grad.clone())
             for name, p in quantizer.named_parameters() if p.grad is not None}
    return {"entropy_codebook": out.stats["entropy_codebook"], "grads": grads}


EVAL_QUANTIZERS = ("lgq", "lfq", "ibq", "vq")


@torch.no_grad()
def eval_statistics(name: str, z: torch.Tensor) -> dict:
    """Loss and stats of an eval-mode forward of a freshly seeded quantizer (K = 16)."""
    from tokenizer.quantizers import build_quantizer

    torch.manual_seed(3)
    out = build_quantizer(name, DIM, LFQ_K).eval()(z)
    return {"loss": out.loss, **out.stats}


def average_grad(grad: torch.Tensor, world: int) -> torch.Tensor:
    grad = grad.clone()
    dist.all_reduce(grad)
    return grad / world


def main(out_path: str) -> None:
    state = PartialState(cpu=True)  # gloo on CPU (docs/environment.md §1: --multi_gpu + ACCELERATE_USE_CPU)
    world = state.num_processes
    assert world == 2 and dist.is_initialized(), f"expected 2 DDP processes, got {world}"
    rank = state.process_index
    half = fixed_batch().chunk(world)[rank]

    usage_only = make_quantizer(quant_loss_weight=0.0, peak_weight=0.0, usage_weight=1.0)
    out = usage_only(half)
    out.loss.backward()  # loss == L_usage
    grad_usage = average_grad(usage_only.codebook.grad, world)
    usage = usage_only.soft_usage(half).detach()

    default = make_quantizer()
    z = half.clone().requires_grad_(True)
    total = default(z)
    total.loss.backward()
    grad_total = average_grad(default.codebook.grad, world)
    grads = [torch.empty_like(z.grad) for _ in range(world)]
    dist.all_gather(grads, z.grad)

    lfq = {mode: lfq_statistics(make_lfq(mode), half, world) for mode in ("exact", "factorized")}

    eval_stats = {name: eval_statistics(name, half) for name in EVAL_QUANTIZERS} if rank == 0 else None

    if rank == 0:
        torch.save({
            "eval": eval_stats,
            **{f"lfq_{mode}": stats for mode, stats in lfq.items()},
            "world_size": world,
            "usage": usage,
            "loss_usage": out.stats["loss_usage"],
            "grad_usage": grad_usage,
            "grad_total": grad_total,
            "grad_input": torch.cat(grads),
        }, out_path)
    end_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
    # Everything is written and the group destroyed (barrier first); skip interpreter finalization, where gloo's
    # worker threads can still hold tensors with Python references and abort the process ("terminate called
    # without an active exception", exit -6: seen once in rank 1 of this script on 2026-12-03; upstream:
    # pytorch/pytorch#179291). The test reads the saved results, so nothing is lost by not finalizing.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
