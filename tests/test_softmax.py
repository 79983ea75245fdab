"""Softmax without denormals (common/softmax.py) and every soft path that uses it: IBQ, LFQ, both samplers.
(LGQ's chunked soft path is tested in tests/test_lgq.py.)"""
import math

import pytest
import torch

import prior.scheduler
from common.softmax import SOFTMAX_TAIL_NATS, drop_log_probability_tail, drop_softmax_tail
from prior.scheduler import AutoregressiveScheduler, MaskGITScheduler, filter_logits
from tokenizer.quantizers.ibq import _soft_path_chunk
from tokenizer.quantizers.lfq import _code_probability_sum

TAIL = math.exp(-SOFTMAX_TAIL_NATS)


@pytest.fixture(autouse=True)
def flush_to_zero_off():
    torch.set_flush_denormal(False)  # the default; the results must not depend on it


def denormal_count(t: torch.Tensor) -> int:
    """Entries that are neither 0 nor a normal float (0 < |t| < smallest normal)."""
    return int(((t != 0) & (t.abs() < torch.finfo(t.dtype).tiny)).sum())


def peaked_logits(rows=64, K=4096, spread=200.0, seed=0):
    """Logits spread uniformly over `spread` nats below their maximum: the full softmax has denormals."""
    g = torch.Generator().manual_seed(seed)
    return -spread * torch.rand(rows, K, generator=g)


def test_dropped_tail_is_exactly_zero_and_the_rest_equals_the_full_softmax():
    logits = peaked_logits().requires_grad_(True)
    full = torch.softmax(logits.detach().double(), dim=1)
    assert denormal_count(torch.softmax(logits.detach(), dim=1)) > 0  # what the plain fp32 softmax emits
    p = torch.softmax(drop_softmax_tail(logits), dim=1)
    dropped = logits.detach() - logits.detach().amax(1, keepdim=True) <= -SOFTMAX_TAIL_NATS
    assert dropped.float().mean() > 0.5
    assert (p[dropped] == 0).all() and (p[~dropped] > 0).all() and denormal_count(p) == 0
    assert (full[dropped] < TAIL * full.amax(1, keepdim=True).expand_as(full)[dropped]).all()
    assert torch.allclose(p[~dropped].double(), full[~dropped], rtol=1e-5, atol=0)  # fp32 rounding only
    # in place (out=) gives the same, and the gradient is the full softmax's up to the dropped tail
    assert torch.equal(drop_softmax_tail(logits.detach().clone(), out=logits.detach().clone()),
                       drop_softmax_tail(logits.detach()))
    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(1))
    (p * weights).sum().backward()
    full_logits = logits.detach().double().requires_grad_(True)
    (torch.softmax(full_logits, dim=1) * weights.double()).sum().backward()
    assert (logits.grad[dropped] == 0).all() and denormal_count(logits.grad) == 0
    assert float((logits.grad.double() - full_logits.grad).abs().max()) <= 1e-6 * float(full_logits.grad.abs().max())


def test_normalised_log_probabilities_drop_the_same_tail():
    log_p = torch.log_softmax(peaked_logits(), dim=1)
    p = drop_log_probability_tail(log_p).exp()
    assert denormal_count(log_p.exp()) > 0 and denormal_count(p) == 0
    assert torch.equal(p == 0, log_p <= -SOFTMAX_TAIL_NATS)
    assert torch.allclose(p.sum(1), torch.ones(p.shape[0]), atol=1e-6)


def test_ibq_soft_path_has_no_denormals_and_finite_gradients():
    """IBQ's sharpened softmax (T_e = 0.01) on LayerNorm-scale tokens: p' (here one token, so sum_n p'_n = p')
    is 0 or normal; the entropy equals the float64 one; gradients are finite (0 log 0 := 0)."""
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.layer_norm(torch.randn(1, 16, generator=g), (16,)).requires_grad_(True)
    codebook = (0.1 * torch.randn(1024, 16, generator=g)).requires_grad_(True)  # logits / T_e: std ~40 nats
    full = torch.softmax((x @ codebook.t()).detach().double() / 0.01, dim=1)
    assert denormal_count(full.float()) > 0
    q_soft, entropy_sum, prob_sum = _soft_path_chunk(x, codebook, 0.01)
    assert denormal_count(prob_sum) == 0 and torch.allclose(prob_sum.double(), full[0], rtol=1e-4, atol=TAIL)
    reference_entropy = -(full * full.clamp_min(1e-300).log()).sum()
    assert torch.allclose(entropy_sum.double(), reference_entropy, rtol=1e-4, atol=1e-6)
    (q_soft.sum() + entropy_sum + prob_sum.square().sum()).backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(codebook.grad).all()
    assert denormal_count(codebook.grad) == 0


def test_lfq_code_probabilities_have_no_denormals():
    """LFQ's exact batch entropy: p_nk = prod_j p_nj(c_kj) from per-bit logits 4 u / T (here ~20 per bit)."""
    bits = 10
    g = torch.Generator().manual_seed(0)
    bit_logits = 20.0 * torch.randn(1, bits, generator=g)
    code_bits = ((torch.arange(2**bits)[:, None] >> torch.arange(bits)) % 2).float()
    log_p = torch.nn.functional.logsigmoid(bit_logits) @ code_bits.t() \
        + torch.nn.functional.logsigmoid(-bit_logits) @ (1 - code_bits).t()
    assert denormal_count(log_p.exp()) > 0
    p = _code_probability_sum(torch.nn.functional.logsigmoid(bit_logits),
                              torch.nn.functional.logsigmoid(-bit_logits), code_bits)
    assert denormal_count(p) == 0 and math.isclose(float(p.sum()), 1.0, rel_tol=1e-5)


@pytest.mark.parametrize("kind", ["maskgit", "gpt", "gpt-top-p"])
def test_samplers_draw_from_probabilities_without_denormals(monkeypatch, kind):
    """The probabilities both schedulers hand to ``sample_categorical`` are 0 or normal for peaked logits,
    and the draw for a seed is the one from the full softmax (the dropped tail has mass < K e^-40)."""
    K, B = 4096, 3
    logits = peaked_logits(rows=B * 4, K=K).reshape(B, 4, K)
    handed = []

    def recording_sample_categorical(probs, generator, rows_per_sample=None):
        handed.append(probs)
        return real_sample_categorical(probs, generator, rows_per_sample)

    real_sample_categorical = prior.scheduler.sample_categorical
    monkeypatch.setattr(prior.scheduler, "sample_categorical", recording_sample_categorical)
    if kind == "maskgit":
        scheduler = MaskGITScheduler(codebook_size=K)
        scheduler.set_timesteps(2)
        tokens = scheduler.step(logits, 0, torch.full((B, 4), K), generator=torch.Generator().manual_seed(0))
        full = torch.softmax(logits.reshape(-1, K), dim=-1)
    else:
        scheduler = AutoregressiveScheduler(codebook_size=K)
        scheduler.set_timesteps(4)
        top_p = 0.9 if kind == "gpt-top-p" else None
        tokens = scheduler.step(logits[:, 0], 0, torch.full((B, 4), K), generator=torch.Generator().manual_seed(0),
                                top_p=top_p)
        full = torch.softmax(filter_logits(logits[:, 0], top_p=top_p), dim=-1)
    assert denormal_count(full) > 0 or kind == "gpt-top-p"
    (probs,) = handed
    assert denormal_count(probs) == 0
    full_draw = real_sample_categorical(full, torch.Generator().manual_seed(0))
    assert torch.equal(real_sample_categorical(probs, torch.Generator().manual_seed(0)), full_draw)
    assert tokens.pred_original_sample is not None
