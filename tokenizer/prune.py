"""Codebook pruning: ``python -m tokenizer.prune`` (also under ``accelerate launch -m tokenizer.prune``).

    python -m tokenizer.prune --tokenizer runs/tok/tokenizer --output runs/tok/tokenizer_pruned \
        --data.name glyphs --split train [--min-count 1 | --keep 128 | --keep-fraction 0.5]

1. Count hard code usage c_k = #{tokens n of the split: i_n = k} with the tokenizer in eval mode (the indices
   ``tokenizer.encode`` returns). With several processes, process r encodes images r, r + W, r + 2W, ... and
   the per-process counts (a fixed-size int64 tensor [K]) are summed with one ``accelerator.reduce`` that every
   process reaches exactly once, after its own loop.
2. Keep a set S of K' codes (``select_codes``): ``min_count`` (default 1: drop the never-used codes) keeps
   {k : c_k >= min_count}; ``keep`` keeps the K' most used codes; ``keep_fraction`` the ceil(f K) most used
   (ties in count go to the lower index). Kept codes keep their order: new index j is the j-th kept old index.
3. The index map m : [0, K) -> [0, K'): m(k) = position of k in S for a kept code; for a removed code, the
   kept code nearest to it, m(k) = argmin_{j in S} ||d_k - d_j||^2, with d_k the latent the decoder receives
   for index k (``decoder_codes``: ``quantizer.indices_to_latents``). Old token files are remapped with
   ``remap_tokens`` (new = m[old]).
4. Write a new export (``save_pretrained``, safetensors) with K' codes whose config records the map under
   ``codebook_pruning`` (``old_to_new`` [K], ``kept_old_indices`` [K'], the rule and the counts' provenance).
5. Measure on the counted split (same sharding, one more reduce of a fixed-size tensor): PSNR of the source
   tokenizer, of the pruned tokenizer (re-encoding: each latent goes to its best kept code by the quantizer's
   own rule) and of the old tokens remapped by m, decoded by the pruned tokenizer; printed and written to
   ``report`` (default ``OUTPUT/pruning_report.json``) with the counts.

Which quantizers: those with an explicit codebook, LGQ, VQ, SimVQ and IBQ. FSQ and LFQ are refused: their
codes are implicit (FSQ's are the points of a fixed grid and an index is a mixed-radix number of grid
coordinates; LFQ's are the 2^b sign patterns and an index is a bit string), so no code can be removed without
changing what every other index means. SimVQ's codes are c_k = W b_k (frozen basis b, learned map W): the
pruned export stores the kept effective codes c_k themselves as its frozen basis and the identity as W, so the
kept codes are exactly the source's (a GEMM over fewer rows need not round alike); fine-tuning it learns a new
map on top of them.

Exactness. When only never-used codes go (``min_count`` 1), ``pruned.decode(pruned.encode(x))`` is bit-identical
to ``source.decode(source.encode(x))`` for every image of the counted split, and ``pruned.encode(x) =
m[source.encode(x)]``: the kept codes are copied exactly, the hard index is an argmin/argmax over codes in which
a removed code never won, and decoding reads only the chosen code. (Tested on CPU. A matrix library whose
rounding of the token-code scores changed with the number of codes could flip an exact tie.) This is about the
token path every stage uses (encode -> tokens -> decode: extraction, priors, pipeline, eval.reconstruction).
LGQ's training forward ``tokenizer(x)`` is not part of it: its value q_soft + (c_i - q_soft) involves the soft
assignment over all K codes (q_soft = sum_k p_nk c_k), which loses the removed codes' (tiny) weights, so it can
differ from the pruned model's in the last bits.
"""
from __future__ import annotations

import dataclasses
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from omegaconf import MISSING
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from common.cli import make_parser, parse_command_line
from common.config import load_config
from common.data import (DataConfig, build_image_dataset, class_balanced_indices, dataset_labels, dataset_size,
                         process_share)
from common.files import file_lock, publish_folder, temporary_path, write_json
from common.metrics import PSNR_CAP_DB, code_histogram, psnr, to_uint8
from common.training import end_process_group, make_accelerator
from tokenizer.model import CODEBOOK_PRUNING_KEY, LGQTokenizer

# per-code tensors of each prunable quantizer's state dict (rows indexed by code)
PER_CODE_TENSORS = {
    "lgq": ("codebook", "usage_ema"),
    "vq": ("codebook", "ema_cluster_size", "ema_code_sum", "usage_ema"),
    "ibq": ("codebook",),
    "simvq": ("frozen_codebook",),  # after folding W into the basis (see module doc)
}
IMPLICIT_CODEBOOKS = {
    "fsq": "FSQ's codes are the points of a fixed grid (the product of its levels) and an index is the mixed-radix "
           "number of a point's grid coordinates",
    "lfq": "LFQ's codes are the 2^bits sign patterns of its projected latent and an index is that bit string",
}
REPORT_FILE = "pruning_report.json"


@dataclass
class PruneConfig:
    """tokenizer: LGQTokenizer export to prune. output: folder of the pruned export (must not exist unless
    overwrite). split: data split whose hard code usage is counted (the prior's training split keeps its tokens
    exact). Keep rule, at most one of: min_count (keep codes used at least this often; the default rule with 1),
    keep (the K' most used codes), keep_fraction (the ceil(f K) most used). num_images: class-balanced subset of
    the split (default: all of it). report: JSON to write (default OUTPUT/pruning_report.json)."""

    tokenizer: str = MISSING
    output: str = MISSING
    split: str = "train"
    min_count: Optional[int] = None
    keep: Optional[int] = None
    keep_fraction: Optional[float] = None
    num_images: Optional[int] = None
    batch_size: int = 64
    report: Optional[str] = None
    overwrite: bool = False
    data: DataConfig = field(default_factory=DataConfig.unresolved)

    def validate(self) -> None:
        self.data.check_split(self.split)
        rules = [name for name in ("min_count", "keep", "keep_fraction") if getattr(self, name) is not None]
        if len(rules) > 1:
            raise ValueError(f"give at most one keep rule, got {rules}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.num_images is not None and self.num_images < 1:
            raise ValueError(f"num_images must be >= 1 (or null for the whole split), got {self.num_images}")


# ----------------------------------------------------------------------------- what can be pruned
def check_prunable(tokenizer) -> str:
    """The tokenizer's quantizer name if it has an explicit codebook; ValueError naming the reason otherwise."""
    name = str(tokenizer.config.quantizer).lower()
    if name in IMPLICIT_CODEBOOKS:
        raise ValueError(f"cannot prune a {name.upper()} tokenizer: its codebook is implicit ({IMPLICIT_CODEBOOKS[name]}); "
                         f"removing a code would change what every other index means. Pruning works for quantizers "
                         f"with an explicit codebook: {sorted(PER_CODE_TENSORS)}")
    if name not in PER_CODE_TENSORS:
        raise ValueError(f"cannot prune quantizer {name!r}: pruning knows {sorted(PER_CODE_TENSORS)}")
    return name


@torch.no_grad()
def decoder_codes(quantizer) -> torch.Tensor:
    """d_k for k = 0..K-1: the latent [C] the decoder receives for index k (``indices_to_latents``), as [K, C] fp32."""
    K = int(quantizer.codebook_size)
    device = next(iter(quantizer.state_dict().values())).device
    latents = quantizer.indices_to_latents(torch.arange(K, device=device).reshape(1, 1, K))  # [1, C, 1, K]
    return latents[0, :, 0, :].t().float().contiguous()


# ----------------------------------------------------------------------------- counting
@torch.no_grad()
def count_code_usage(tokenizer, dataset, accelerator=None, batch_size: int = 64, num_workers: int = 0,
                     progress: bool = True) -> torch.Tensor:
    """Hard usage c_k (int64 [K], on CPU) of ``tokenizer.encode`` over every image of ``dataset``.

    Process r of W encodes items r, r + W, ... (shards r, r + W, ... of a stream); the counts are summed over processes with one
    ``accelerator.reduce`` of a [K] tensor, reached once by every process whatever its number of batches.
    """

    K = int(tokenizer.codebook_size)
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)
    device = accelerator.device if accelerator is not None else tokenizer.device
    tokenizer.to(device).eval()
    counts = torch.zeros(K, dtype=torch.long, device=device)
    loader = DataLoader(process_share(dataset, rank, world), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers)

    for images, _ in tqdm(loader, desc="count codes", unit="batch", disable=not (progress and rank == 0)):
        counts += code_histogram(tokenizer.encode(images.to(device, tokenizer.dtype)), K).to(device)
    if world > 1:
        counts = accelerator.reduce(counts, reduction="sum")
    return counts.cpu()


def select_codes(counts: torch.Tensor, min_count: int | None = None, keep: int | None = None,
                 keep_fraction: float | None = None) -> torch.Tensor:
    """Old indices of the kept codes, ascending (int64 [K']); the rules of the module doc (default min_count=1)."""
    counts = torch.as_tensor(counts).long().reshape(-1)
    K = counts.numel()
    rules = {name: value for name, value in (("min_count", min_count), ("keep", keep), ("keep_fraction", keep_fraction))
             if value is not None}
    if len(rules) > 1:
        raise ValueError(f"give at most one keep rule, got {sorted(rules)}")
    if keep_fraction is not None:
        if not 0.0 < float(keep_fraction) <= 1.0:
            raise ValueError(f"keep_fraction must lie in (0, 1], got {keep_fraction}")
        keep = math.ceil(float(keep_fraction) * K)
    if keep is not None:
        if not 2 <= int(keep) <= K:
            raise ValueError(f"keep must lie in [2, K={K}] (a codebook needs at least 2 codes), got {keep}"
                             + (f" (from keep_fraction={keep_fraction})" if keep_fraction is not None else ""))
        order = torch.sort(-counts, stable=True).indices  # most used first, lower index first among ties
        return order[: int(keep)].sort().values
    threshold = 1 if min_count is None else int(min_count)
    if threshold < 0:
        raise ValueError(f"min_count must be >= 0, got {min_count}")
    kept = (counts >= threshold).nonzero().squeeze(1)
    if kept.numel() < 2:
        raise ValueError(f"only {kept.numel()} code(s) of {K} are used at least {threshold} times: a codebook needs at "
                         f"least 2 codes; lower min_count or use keep=N")
    return kept


def old_to_new_map(codes: torch.Tensor, kept: torch.Tensor, chunk_size: int = 4096) -> torch.Tensor:
    """m [K] int64: m(k) = position of k among ``kept`` for kept codes, else argmin_{j} ||codes_k - codes_kept_j||^2
    (the nearest kept code; the lower new index among exact ties). codes [K, C]."""
    K = codes.shape[0]
    kept = kept.to(codes.device)
    mapping = torch.full((K,), -1, dtype=torch.long, device=codes.device)
    mapping[kept] = torch.arange(kept.numel(), device=codes.device)
    removed = (mapping < 0).nonzero().squeeze(1)
    kept_codes = codes[kept].double()
    for start in range(0, removed.numel(), chunk_size):
        rows = removed[start:start + chunk_size]
        mapping[rows] = torch.cdist(codes[rows].double(), kept_codes).argmin(1)
    return mapping


def remap_tokens(tokens, old_to_new):
    """Token grids of the source tokenizer (any int array or tensor) -> the pruned tokenizer's: old_to_new[tokens].

    ``old_to_new`` is the list in ``pruned.config.codebook_pruning["old_to_new"]`` (or a tensor/array)."""
    if isinstance(tokens, torch.Tensor):
        return torch.as_tensor(old_to_new, dtype=torch.long, device=tokens.device)[tokens.long()]

    mapping = np.asarray(old_to_new, dtype=np.int64)
    return mapping[np.asarray(tokens).astype(np.int64)].astype(np.asarray(tokens).dtype)


# ----------------------------------------------------------------------------- the pruned model
@torch.no_grad()
def prune_tokenizer(tokenizer, kept: torch.Tensor, record: dict[str, Any] | None = None):
    """A new LGQTokenizer with the codes ``kept`` (old indices, ascending) and everything else copied.

    Per-code tensors (``PER_CODE_TENSORS``) keep their rows ``kept``; SimVQ's basis becomes the kept effective
    codes with the identity map. ``record`` is stored in the config under ``codebook_pruning``.
    """
    name = check_prunable(tokenizer)
    kept = torch.as_tensor(kept, dtype=torch.long).cpu()
    source_state = {k: v.detach().cpu() for k, v in tokenizer.state_dict().items()}
    state = dict(source_state)
    if name == "simvq":
        effective = tokenizer.quantizer.codes().detach().cpu()  # c = W b for all K codes, computed once
        state["quantizer.frozen_codebook"] = effective.to(source_state["quantizer.frozen_codebook"].dtype)
        weight = source_state["quantizer.codebook_map.weight"]
        state["quantizer.codebook_map.weight"] = torch.eye(weight.shape[0], dtype=weight.dtype)
    for tensor_name in PER_CODE_TENSORS[name]:
        key = f"quantizer.{tensor_name}"
        if key in state:
            state[key] = state[key][kept].clone()
    config = {k: v for k, v in dict(tokenizer.config).items() if k != CODEBOOK_PRUNING_KEY}
    config["codebook_size"] = int(kept.numel())
    pruned = type(tokenizer).from_config(config)
    pruned.load_state_dict(state, strict=True)
    if record is not None:
        pruned.register_to_config(**{CODEBOOK_PRUNING_KEY: record})
    return pruned.to(tokenizer.device).eval()


def save_export_atomically(model, output: Path, overwrite: bool) -> bool:
    """``save_pretrained`` into a temporary sibling folder, then publish it as ``output`` (``common.files``), under
    ``file_lock(output)``. Another prune that finished the same export first wins (same config, so the same
    weights: False, it is kept); an existing export of other settings is replaced with ``overwrite``, else refused."""
    with file_lock(output):
        if output.exists() and not overwrite:
            existing = json.loads((output / "config.json").read_text()) if (output / "config.json").is_file() else None
            if existing is None or existing.get(CODEBOOK_PRUNING_KEY) != json.loads(json.dumps(
                    model.config.get(CODEBOOK_PRUNING_KEY))):
                raise FileExistsError(f"{output} exists; choose another output or pass overwrite=true")
            return False
        tmp = temporary_path(output)
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, safe_serialization=True)
        return publish_folder(tmp, output, replace=overwrite)


# ----------------------------------------------------------------------------- measuring
@torch.no_grad()
def evaluate_pruning(source, pruned, kept: torch.Tensor, old_to_new: torch.Tensor, dataset, accelerator=None, batch_size: int = 64,
                     num_workers: int = 0, progress: bool = True) -> dict[str, Any]:
    """PSNR (per image on uint8, averaged, ``common.metrics.PSNR_CAP_DB`` cap) over ``dataset`` of

    source:   source.decode(i),            i = source's indices
    pruned:   pruned.decode(j),            j = pruned's own indices (re-encoding)
    remapped: pruned.decode(old_to_new[i]) (old token files remapped)

    (``kept``: old indices of the pruned codes, ascending), plus counts of images whose pruned reconstruction is bit-identical to the source's and of tokens whose
    code changed. Sharded like ``count_code_usage``; one ``accelerator.reduce`` of a fixed-size tensor.
    """

    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)
    device = accelerator.device if accelerator is not None else source.device
    source.to(device).eval()
    pruned.to(device).eval()
    mapping, kept_old = old_to_new.to(device), kept.to(device)
    totals = torch.zeros(8, dtype=torch.float64, device=device)
    loader = DataLoader(process_share(dataset, rank, world), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers)

    for images, _ in tqdm(loader, desc="evaluate pruning", unit="batch", disable=not (progress and rank == 0)):
        images = images.to(device, source.dtype)
        old = source.encode(images)
        new = pruned.encode(images)
        remapped = mapping[old]
        real = to_uint8(images.float())
        recon_source = source.decode(old)
        recon_pruned = pruned.decode(new)
        recon_remapped = recon_pruned if torch.equal(new, remapped) else pruned.decode(remapped)
        identical = (recon_pruned == recon_source).flatten(1).all(1)
        totals += torch.stack([
            psnr(real, to_uint8(recon_source.float()), max_db=PSNR_CAP_DB).double().sum(),
            psnr(real, to_uint8(recon_pruned.float()), max_db=PSNR_CAP_DB).double().sum(),
            psnr(real, to_uint8(recon_remapped.float()), max_db=PSNR_CAP_DB).double().sum(),
            torch.tensor(float(images.shape[0]), dtype=torch.float64, device=device),
            identical.double().sum(),
            torch.tensor(float(old.numel()), dtype=torch.float64, device=device),
            (kept_old[new] != old).double().sum(),  # the token now decodes from another code than before
            (new != remapped).double().sum(),  # re-encoding and the index map disagree
        ])
    if world > 1:
        totals = accelerator.reduce(totals, reduction="sum")
    totals = totals.cpu().tolist()
    images_count = max(totals[3], 1.0)
    result = {
        "psnr_source": totals[0] / images_count,
        "psnr_pruned": totals[1] / images_count,
        "psnr_remapped": totals[2] / images_count,
        "num_images": int(totals[3]),
        "identical_images": int(totals[4]),
        "num_tokens": int(totals[5]),
        "tokens_on_another_code": int(totals[6]),
        "tokens_where_reencoding_and_map_differ": int(totals[7]),
    }
    result["psnr_change_db"] = result["psnr_pruned"] - result["psnr_source"]
    result["psnr_change_remapped_db"] = result["psnr_remapped"] - result["psnr_source"]
    result["bit_identical"] = result["identical_images"] == result["num_images"]
    return result


# ----------------------------------------------------------------------------- command line
def parse_config(argv: Sequence[str]) -> PruneConfig:
    """The command line in the common.cli style (``--key value`` / ``key=value``, ``--config FILE.yaml``, ``--help``)."""

    parser = make_parser("python -m tokenizer.prune", __doc__.split("\n\n")[0], PruneConfig)
    args, overrides = parse_command_line(parser, argv, PruneConfig)
    return load_config(PruneConfig, args.config or None, overrides)


def rule_text(cfg: PruneConfig) -> str:
    if cfg.keep is not None:
        return f"keep={cfg.keep} (the most used codes)"
    if cfg.keep_fraction is not None:
        return f"keep_fraction={cfg.keep_fraction} (the most used codes)"
    return f"min_count={1 if cfg.min_count is None else cfg.min_count}"


def format_report(report: dict[str, Any]) -> str:
    evaluation = report["evaluation"]
    lines = [
        f"codes           {report['source_codebook_size']} -> {report['codebook_size']} ({report['rule']}; "
        f"{report['removed_used_codes']} removed code(s) were used on the split)",
        f"counted         {report['counted']['num_tokens']} tokens of {report['counted']['num_images']} images "
        f"({report['counted']['split']} split)",
        f"PSNR source     {evaluation['psnr_source']:.3f} dB",
        f"PSNR pruned     {evaluation['psnr_pruned']:.3f} dB ({evaluation['psnr_change_db']:+.3f} dB; re-encoded)",
        f"PSNR remapped   {evaluation['psnr_remapped']:.3f} dB ({evaluation['psnr_change_remapped_db']:+.3f} dB; "
        f"old tokens through old_to_new)",
        f"identical       {evaluation['identical_images']} / {evaluation['num_images']} reconstructions bit-identical; "
        f"{evaluation['tokens_on_another_code']} tokens moved to another code",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:

    cfg = parse_config(sys.argv[1:] if argv is None else argv)
    start = time.time()
    output = Path(cfg.output)
    if Path(cfg.tokenizer).resolve() == output.resolve():
        raise ValueError("output must differ from the source tokenizer folder")
    if output.exists() and not cfg.overwrite:  # every process decides alike, before any collective
        raise FileExistsError(f"{output} exists; choose another output or pass overwrite=true")
    accelerator = make_accelerator()
    source = LGQTokenizer.from_pretrained(cfg.tokenizer).to(accelerator.device).eval()
    check_prunable(source)
    data_cfg = dataclasses.replace(cfg.data, random_flip=False)
    dataset = build_image_dataset(data_cfg, split=cfg.split)
    if cfg.num_images is not None:
        dataset = Subset(dataset, class_balanced_indices(dataset_labels(dataset), cfg.num_images))
    counts = count_code_usage(source, dataset, accelerator, cfg.batch_size, data_cfg.num_workers)
    kept = select_codes(counts, cfg.min_count, cfg.keep, cfg.keep_fraction)
    mapping = old_to_new_map(decoder_codes(source.quantizer).cpu(), kept)
    removed = torch.ones(counts.numel(), dtype=torch.bool)
    removed[kept] = False
    record = {
        "source_codebook_size": int(counts.numel()),
        "codebook_size": int(kept.numel()),
        "kept_old_indices": kept.tolist(),
        "old_to_new": mapping.tolist(),
        "rule": rule_text(cfg),
        "removed_used_codes": int((removed & (counts > 0)).sum()),
        "remap": "a removed code maps to the nearest kept code (euclidean distance between the latents the decoder "
                 "receives); new tokens = old_to_new[old tokens] (tokenizer.prune.remap_tokens)",
        "counted": {"split": cfg.split, "num_images": dataset_size(dataset), "num_tokens": int(counts.sum()),
                    "data": dataclasses.asdict(data_cfg)},
        "source_tokenizer": str(Path(cfg.tokenizer).resolve()),
        "source_pruning": source.config.get(CODEBOOK_PRUNING_KEY),
    }
    pruned = prune_tokenizer(source, kept, record)
    if accelerator.is_main_process:
        save_export_atomically(pruned, output, cfg.overwrite)
    accelerator.wait_for_everyone()
    evaluation = evaluate_pruning(source, pruned, kept, mapping, dataset, accelerator, cfg.batch_size, data_cfg.num_workers)
    report = {key: record[key] for key in ("source_codebook_size", "codebook_size", "rule", "removed_used_codes",
                                           "counted", "source_tokenizer")}
    report.update(output=str(output.resolve()), evaluation=evaluation, counts=counts.tolist(),
                  kept_old_indices=record["kept_old_indices"], old_to_new=record["old_to_new"],
                  num_processes=accelerator.num_processes, seconds=round(time.time() - start, 2),
                  protocol="hard usage of tokenizer.encode (eval mode) over the split; PSNR per image on uint8, "
                           "averaged; pruned = re-encoded by the pruned tokenizer, remapped = the source's tokens "
                           "through old_to_new decoded by the pruned tokenizer")
    report_path = Path(cfg.report) if cfg.report else output / REPORT_FILE
    if accelerator.is_main_process:
        write_json(report_path, report)
        print(format_report(report))
        print(f"pruned tokenizer written to {output}; report {report_path}")
    end_process_group()  # the last collective: every process waits for the report
    return report


if __name__ == "__main__":
    main()
