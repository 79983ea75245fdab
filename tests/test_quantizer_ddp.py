"""Quantizer batch statistics in real 2-process gloo DDP == one process on the whole batch."""
import importlib.util
from pathlib import Path

import pytest
import torch

from ddp import run_ddp  # tests/ddp.py (pytest puts tests/ on sys.path)

SCRIPT = Path(__file__).parent / "scripts" / "ddp_quantizer_usage.py"


def load_script():
    spec = importlib.util.spec_from_file_location("ddp_quantizer_usage", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_batch_statistics_are_global_under_ddp(tmp_path):
    out_path = tmp_path / "ddp_usage.pt"
    run_ddp(SCRIPT, out_path, nproc=2, timeout=180)
    ddp = torch.load(out_path)
    assert ddp["world_size"] == 2

    script = load_script()
    batch = script.fixed_batch()
    usage_only = script.make_quantizer(quant_loss_weight=0.0, peak_weight=0.0, usage_weight=1.0)
    out = usage_only(batch)
    out.loss.backward()
    usage = usage_only.soft_usage(batch).detach()
    default = script.make_quantizer()
    z = batch.clone().requires_grad_(True)
    default(z).loss.backward()

    assert torch.allclose(ddp["usage"], usage, atol=1e-6)
    assert torch.allclose(ddp["loss_usage"], out.stats["loss_usage"], rtol=1e-5)
    assert torch.allclose(ddp["grad_usage"], usage_only.codebook.grad, rtol=1e-4, atol=1e-6)
    assert torch.allclose(ddp["grad_total"], default.codebook.grad, rtol=1e-4, atol=1e-6)
    # rank-local input grads carry the global L_usage term W times and the local means once:
    # the gradient of the averaged DDP objective is grad / W, which is the single-process gradient.
    assert torch.allclose(ddp["grad_input"] / 2, z.grad, rtol=1e-4, atol=1e-7)
    # a per-rank (non-global) usage would differ: make sure the check has teeth
    local = usage_only.soft_usage(batch[:2]).detach()
    assert not torch.allclose(local, usage, atol=1e-3)

    # LFQ: batch (codebook) entropy from all-reduced code / bit probabilities, both modes
    for mode in ("exact", "factorized"):
        single = script.lfq_statistics(script.make_lfq(mode), batch)
        ddp_lfq = ddp[f"lfq_{mode}"]
        assert torch.allclose(ddp_lfq["entropy_codebook"], single["entropy_codebook"], rtol=1e-5), mode
        local_entropy = script.lfq_statistics(script.make_lfq(mode), batch[:2])["entropy_codebook"]
        assert not torch.allclose(local_entropy, single["entropy_codebook"], rtol=1e-3), mode
        assert ddp_lfq["grads"].keys() == single["grads"].keys() and single["grads"]
        for name, grad in single["grads"].items():
            assert torch.allclose(ddp_lfq["grads"][name], grad, rtol=1e-4, atol=1e-6), (mode, name)

    # eval mode: rank 0 quantized alone without hanging, with the statistics of its local half
    for name in script.EVAL_QUANTIZERS:
        local = script.eval_statistics(name, batch.chunk(2)[0])
        assert ddp["eval"][name].keys() == local.keys(), name
        for key, value in local.items():
            assert torch.allclose(ddp["eval"][name][key], value, rtol=1e-5, atol=1e-7), (name, key)
