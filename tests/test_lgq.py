"""LGQ quantizer: exact soft-to-hard straight-through, losses, chunked autograd == dense reference."""
import math

import pytest
import torch
import torch.nn.functional as F

from common.softmax import SOFTMAX_TAIL_NATS
from test_softmax import denormal_count
from tokenizer.quantizers import build_quantizer
from tokenizer.quantizers.lgq import (
    LGQuantizer,
    SoftAssignment,
    auto_chunk_size,
    lgq_dense_reference,
    logit_operands,
    tau_at_progress,
)


def make_quantizer(dim=8, K=37, **kw):
    torch.manual_seed(0)
    return LGQuantizer(dim, K, **kw)


def latents(B=2, C=8, H=3, W=5, seed=1, **kw):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, C, H, W, generator=g, **kw)


def flat(z):
    return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])


def test_registry_and_shapes_and_dtypes():
    q = build_quantizer("lgq", dim=8, codebook_size=37, tau_end=0.2)
    assert isinstance(q, LGQuantizer) and q.codebook_size == 37 and q.dim == 8
    out = q(latents())
    assert out.quantized.shape == (2, 8, 3, 5) and out.quantized.dtype == torch.float32
    assert out.indices.shape == (2, 3, 5) and out.indices.dtype == torch.int64
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    assert int(out.indices.min()) >= 0 and int(out.indices.max()) < 37
    for key in ("tau", "perplexity", "active_codes", "mean_max_prob", "soft_perplexity",
                "loss_quant", "loss_peak", "loss_usage"):
        assert key in out.stats and out.stats[key].dim() == 0 and not out.stats[key].requires_grad
    assert "loss_usage_floor" not in out.stats


def test_hard_index_is_nearest_centre_and_output_is_that_centre():
    q = make_quantizer()
    z = latents(B=3)
    out = q(z)
    x = flat(z)  # the quantizer takes its input as given (the model normalises in front of it)
    brute = torch.stack([((x[n] - q.codebook) ** 2).sum(1).argmin() for n in range(x.shape[0])])
    assert torch.equal(out.indices.reshape(-1), brute)
    assert torch.allclose(flat(out.quantized), q.codebook[brute], atol=1e-6)
    assert torch.allclose(q.indices_to_latents(out.indices), out.quantized, atol=1e-6)


def test_soft_output_converges_to_hard_as_tau_goes_to_zero():
    torch.manual_seed(0)
    x, c = torch.randn(50, 8), torch.randn(37, 8)
    gaps = []
    for tau in (1.0, 0.1, 0.01, 1e-4):
        ref = lgq_dense_reference(x, c, tau)
        gaps.append(float((ref["q_soft"] - c[ref["indices"]]).abs().max()))
    assert gaps[-1] < 1e-4 and gaps[0] > 1e-2
    assert all(a >= b - 1e-7 for a, b in zip(gaps, gaps[1:]))
    # and the module agrees: at tiny tau its soft output equals the hard one
    q = make_quantizer(tau_start=1e-4, tau_end=1e-4)
    xq, k, b, v = logit_operands(x, q.codebook, "euclidean")
    q_soft, *_ = SoftAssignment.apply(xq, k, b, v, 1e4, 16)
    assert torch.allclose(q_soft, q.codebook[lgq_dense_reference(x, q.codebook, 1e-4)["indices"]], atol=1e-4)


def test_gradients_reach_inputs_and_centres_through_soft_path():
    q = make_quantizer()
    z = latents().requires_grad_(True)
    out = q(z)
    (out.quantized.square().sum()).backward()  # only through the straight-through output
    assert z.grad is not None and z.grad.abs().sum() > 0
    assert q.codebook.grad is not None and q.codebook.grad.abs().sum() > 0


def test_straight_through_is_soft_to_hard_not_identity():
    """d q / d x = (2 / tau) Cov_p(c), not the identity of the VQ-VAE STE."""
    torch.manual_seed(0)
    c = torch.randn(5, 3, dtype=torch.float64)
    x = torch.randn(1, 3, dtype=torch.float64)
    tau = 0.7
    jac = torch.autograd.functional.jacobian(lambda xx: lgq_dense_reference(xx, c, tau)["quantized"], x)[0, :, 0, :]
    p = lgq_dense_reference(x, c, tau)["probs"][0]
    mean = p @ c
    cov = (p[:, None] * (c - mean)).t() @ (c - mean)
    assert torch.allclose(jac, 2.0 / tau * cov, atol=1e-10)


def test_usage_loss_uniform_is_one_and_collapse_is_K():
    K = 6
    c = torch.eye(K) * 50  # well separated centres, tiny tau -> hard assignments
    tau = 1e-3
    uniform = lgq_dense_reference(c.repeat(3, 1), c, tau)
    assert math.isclose(float(uniform["loss_usage"]), 1.0, rel_tol=1e-5)
    collapse = lgq_dense_reference(c[:1].repeat(12, 1), c, tau)
    assert math.isclose(float(collapse["loss_usage"]), float(K), rel_tol=1e-5)
    # the module reports the same
    q = LGQuantizer(K, K, tau_start=tau, tau_end=tau)
    with torch.no_grad():
        q.codebook.copy_(c)
    z = c.repeat(3, 1).t().reshape(1, K, 1, 3 * K)
    assert math.isclose(float(q(z).stats["loss_usage"]), 1.0, rel_tol=1e-5)
    z = c[:1].repeat(12, 1).t().reshape(1, K, 1, 12)
    assert math.isclose(float(q(z).stats["loss_usage"]), float(K), rel_tol=1e-5)


def test_peak_loss_on_hand_computed_probabilities():
    # two centres on a line, x equidistant -> p = (1/2, 1/2) -> 1 - sum p^2 = 1/2;
    # x with logit gap log(3) -> p = (3/4, 1/4) -> 1 - (9/16 + 1/16) = 3/8. Mean = 7/16.
    c = torch.tensor([[-1.0], [1.0]])
    tau = 1.0
    # l_1 - l_0 = (-(x-1)^2 + (x+1)^2) / tau = 4x / tau; want 4x = -log 3 for p_0 = 3/4
    x = torch.tensor([[0.0], [-math.log(3.0) / 4.0]])
    ref = lgq_dense_reference(x, c, tau)
    assert math.isclose(float(ref["loss_peak"]), 7.0 / 16.0, rel_tol=1e-6)
    q = LGQuantizer(1, 2, tau_start=tau, tau_end=tau)
    with torch.no_grad():
        q.codebook.copy_(c)
    out = q(x.t().reshape(1, 1, 1, 2))
    assert math.isclose(float(out.stats["loss_peak"]), 7.0 / 16.0, rel_tol=1e-6)
    assert math.isclose(float(out.stats["mean_max_prob"]), (0.5 + 0.75) / 2, rel_tol=1e-6)
    # weighted total: L_q + 0.005 L_peak + 0.005 L_usage
    expected = float(out.stats["loss_quant"]) + 0.005 * 7 / 16 + 0.005 * float(out.stats["loss_usage"])
    assert math.isclose(float(out.loss.detach()), expected, rel_tol=1e-6)


def assert_close_to_reference(actual, reference, name, rel=2e-5):
    """fp32 module vs float64 reference: max abs error <= rel * max |reference| (+ tiny floor)."""
    actual, reference = actual.detach(), reference.detach().to(actual.dtype)
    err = float((actual - reference).abs().max())
    scale = float(reference.abs().max())
    assert err <= rel * scale + 1e-7, f"{name}: max error {err:.3g} vs scale {scale:.3g}"


@pytest.mark.parametrize("tau", [0.6, 0.1])
@pytest.mark.parametrize("logits", ["euclidean", "dot", "cosine"])
@pytest.mark.parametrize("chunk_size", [1, 7, 64, None])
def test_chunked_module_matches_dense_reference(logits, chunk_size, tau):
    """Values and gradients (inputs and centres) of every loss; chunk sizes 1, 7 do not divide N=30.

    The dense reference runs in float64 on the same inputs, so the tolerance measures the fp32
    error of the chunked module itself. The module drops the softmax tail (probabilities below e^-40 of
    each row's largest are exactly 0, ``common.softmax``) and still matches the full softmax: at tau = 0.1
    (the schedule's end) that tail exists for euclidean and dot logits (cosine logits span only 2 / tau nats).
    """
    torch.manual_seed(3)
    q = LGQuantizer(8, 37, logits=logits, chunk_size=chunk_size, tau_start=tau)
    z = latents(B=2, H=3, W=5).requires_grad_(True)
    out = q(z)
    z_ref = z.detach().double().requires_grad_(True)
    c_ref = q.codebook.detach().double().requires_grad_(True)
    x_ref = flat(z_ref)
    ref = lgq_dense_reference(x_ref, c_ref, tau, logits=logits)
    in_tail = (ref["probs"] > 0) & (ref["probs"] < math.exp(-SOFTMAX_TAIL_NATS) * ref["probs"].amax(1, keepdim=True))
    assert in_tail.any() or logits == "cosine" or tau > 0.5
    assert torch.equal(out.indices.reshape(-1), ref["indices"])
    assert_close_to_reference(flat(out.quantized), ref["quantized"], "quantized")
    for name in ("loss_quant", "loss_peak", "loss_usage"):
        assert_close_to_reference(out.stats[name], ref[name], name)
    u = ref["usage"]
    assert_close_to_reference(out.stats["soft_perplexity"], torch.exp(-(u * u.log()).sum()), "soft_perplexity")
    assert_close_to_reference(out.stats["mean_max_prob"], ref["probs"].max(1).values.mean(), "mean_max_prob")

    # gradients w.r.t. inputs and centres: L_q alone, the weighted total, and a term through the output
    weights = torch.randn(2, 8, 3, 5, generator=torch.Generator().manual_seed(9))
    module_terms = {
        "quant": lambda o: F.mse_loss(flat(o.quantized), flat(z)),
        "total": lambda o: o.loss,
        "output": lambda o: (o.quantized * weights).sum(),
    }
    reference_terms = {
        "quant": ref["loss_quant"],
        "total": ref["loss_quant"] + 0.005 * ref["loss_peak"] + 0.005 * ref["loss_usage"],
        "output": (ref["quantized"] * flat(weights).double()).sum(),
    }
    for name, fn in module_terms.items():
        z.grad, q.codebook.grad = None, None
        fn(q(z)).backward()
        grad_z_ref, grad_c_ref = torch.autograd.grad(reference_terms[name], (z_ref, c_ref), retain_graph=True)
        assert_close_to_reference(z.grad, grad_z_ref, f"d{name}/dz")
        assert_close_to_reference(q.codebook.grad, grad_c_ref, f"d{name}/dc")


def test_soft_path_emits_no_denormal_probabilities(monkeypatch):
    """Peaked logits (tau = 0.05, K = 512): the full softmax has denormal probabilities (exp of logits 87-104
    nats below the row maximum); every p the chunked soft path computes, in forward and in the recomputing
    backward, is 0 or a normal float, and so are the gradients -- with flush-to-zero off (the default)."""
    torch.set_flush_denormal(False)
    torch.manual_seed(0)
    q = LGQuantizer(16, 512, tau_start=0.05, chunk_size=100)
    z = latents(B=2, C=16, H=8, W=8).requires_grad_(True)
    assert denormal_count(lgq_dense_reference(flat(z).detach(), q.codebook.detach(), 0.05)["probs"]) > 0
    computed, softmax = [], torch.softmax

    def recording_softmax(*args, **kwargs):
        result = softmax(*args, **kwargs)
        computed.append(result.detach().clone())  # the [chunk, K] buffer is reused by the next chunk
        return result

    monkeypatch.setattr(torch, "softmax", recording_softmax)
    out = q(z)
    (out.loss + out.quantized.square().mean()).backward()
    monkeypatch.undo()
    # forward (both chunks), the straight-through gain statistic (its first tokens), backward (both chunks)
    assert [p.shape[0] for p in computed] == [100, 28, min(q.STE_GAIN_TOKENS, 128), 100, 28]
    for p in computed:
        assert denormal_count(p) == 0 and torch.allclose(p.sum(1), torch.ones(p.shape[0]), atol=1e-6)
    assert denormal_count(z.grad) == 0 and denormal_count(q.codebook.grad) == 0


@pytest.mark.parametrize("logits", ["euclidean", "dot", "cosine"])
def test_soft_assignment_function_gradcheck(logits):
    """Hand-derived backward of the chunked Function against finite differences (float64)."""
    torch.manual_seed(0)
    x = torch.randn(11, 4, dtype=torch.float64, requires_grad=True)
    c = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)

    def fn(x, c):
        query, keys, bias, values = logit_operands(x, c, logits)
        q_soft, p_sq, usage_sum, _, _ = SoftAssignment.apply(query, keys, bias, values, 1.0 / 0.8, 4)
        return q_soft, p_sq, usage_sum

    assert torch.autograd.gradcheck(fn, (x, c), eps=1e-6, atol=1e-6)


def test_regularisers_match_dense_gradients_separately():
    torch.manual_seed(0)
    x = torch.randn(23, 5, dtype=torch.float64, requires_grad=True)
    c = torch.randn(9, 5, dtype=torch.float64, requires_grad=True)
    for which in ("loss_peak", "loss_usage"):
        ref = lgq_dense_reference(x, c, 0.5)
        gx, gc = torch.autograd.grad(ref[which], (x, c))
        query, keys, bias, values = logit_operands(x, c, "euclidean")
        _, p_sq, usage_sum, _, _ = SoftAssignment.apply(query, keys, bias, values, 2.0, 5)
        loss = (1 - p_sq).mean() if which == "loss_peak" else 9 * ((usage_sum / 23) ** 2).sum()
        assert torch.allclose(loss, ref[which], rtol=1e-12)
        hx, hc = torch.autograd.grad(loss, (x, c))
        assert torch.allclose(hx, gx, rtol=1e-9, atol=1e-12) and torch.allclose(hc, gc, rtol=1e-9, atol=1e-12)


def test_indices_to_latents_round_trip_and_validation():
    q = make_quantizer()
    idx = torch.randint(0, 37, (2, 4, 3))
    lat = q.indices_to_latents(idx)
    assert lat.shape == (2, 8, 4, 3)
    assert torch.equal(lat.permute(0, 2, 3, 1)[1, 2, 0], q.codebook[idx[1, 2, 0]])
    # quantizing the centres returns the same indices
    assert torch.equal(q(q.indices_to_latents(idx)).indices, idx)
    with pytest.raises(ValueError, match=r"\[0, 37\)"):
        q.indices_to_latents(torch.full((1, 2, 2), 37))
    with pytest.raises(ValueError, match="integer"):
        q.indices_to_latents(torch.zeros(1, 2, 2))
    with pytest.raises(ValueError, match="B, H, W"):
        q.indices_to_latents(torch.zeros(2, 2, dtype=torch.long))


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant"])
def test_tau_schedules(schedule):
    q = make_quantizer(tau_start=1.0, tau_end=0.1, tau_schedule=schedule)
    values = []
    for p in (0.0, 0.25, 0.5, 1.0):
        q.set_progress(p)
        values.append(float(q.tau))
    if schedule == "constant":
        assert values == pytest.approx([1.0] * 4)
    else:
        assert values[0] == pytest.approx(1.0) and values[-1] == pytest.approx(0.1)
        assert values[2] == pytest.approx(0.55)
        assert values == sorted(values, reverse=True)
    if schedule == "linear":
        assert values[1] == pytest.approx(1.0 + 0.25 * (0.1 - 1.0))
    if schedule == "cosine":
        assert values[1] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 4)))
    assert tau_at_progress(1.7, 1.0, 0.1, schedule) == pytest.approx(values[-1])  # clamped
    # tau is a buffer: saved and restored with the model, and used by forward
    q.set_progress(1.0)
    fresh = make_quantizer(tau_start=1.0, tau_end=0.1, tau_schedule=schedule)
    fresh.load_state_dict(q.state_dict())
    assert float(fresh.tau) == pytest.approx(values[-1])
    assert float(fresh(latents()).stats["tau"]) == pytest.approx(values[-1])


def test_tau_horizon_in_steps_or_epochs_does_not_depend_on_the_run_length():
    """tau_anneal_steps S: tau(s) is the same whatever max_steps; tau_anneal_epochs E: the authors' per-epoch
    schedule, tau constant within an epoch, tau_end from epoch E on; neither: over the run (the old behaviour)."""
    by_steps = make_quantizer(tau_start=1.0, tau_end=0.1, tau_anneal_steps=40)
    for max_steps in (50, 400, 10_000):
        taus = []
        for step in (0, 10, 40, 45):
            by_steps.set_training_step(step, max_steps, steps_per_epoch=7)
            taus.append(float(by_steps.tau))
        assert taus == pytest.approx([1.0, 1.0 - 0.25 * 0.9, 0.1, 0.1])
    by_epochs = make_quantizer(tau_start=1.0, tau_end=0.1, tau_anneal_epochs=4)
    expected = {0: 1.0, 9: 1.0, 10: 0.7, 19: 0.7, 20: 0.4, 30: 0.1, 95: 0.1}  # 10 steps per epoch: (e - 1) / 3
    for step, tau in expected.items():
        by_epochs.set_training_step(step, 1000, steps_per_epoch=10)
        assert float(by_epochs.tau) == pytest.approx(tau), step
    with pytest.raises(ValueError, match="steps per epoch"):
        by_epochs.set_training_step(3, 100, steps_per_epoch=None)
    over_run = make_quantizer(tau_start=1.0, tau_end=0.1)
    over_run.set_training_step(50, 100)
    assert float(over_run.tau) == pytest.approx(0.55)
    assert by_steps.schedule_description() == "tau linear 1 -> 0.1 over 40 steps"
    assert by_epochs.schedule_description() == "tau linear 1 -> 0.1 per epoch over 4 epochs"
    with pytest.raises(ValueError, match="at most one"):
        LGQuantizer(8, 4, tau_anneal_steps=10, tau_anneal_epochs=2)
    with pytest.raises(ValueError, match="tau_anneal_steps must be None or an integer >= 1"):
        LGQuantizer(8, 4, tau_anneal_steps=0)


def test_sharpness_statistics_are_mean_max_probability_and_mean_sum_of_squares():
    q = make_quantizer(tau_start=0.7, tau_end=0.7)
    z = latents()
    out = q(z)
    x = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    reference = lgq_dense_reference(x, q.codebook.detach(), 0.7)
    p = reference["probs"]
    assert float(out.stats["mean_max_prob"]) == pytest.approx(float(p.max(1).values.mean()), rel=1e-5)
    assert float(out.stats["mean_sum_p_sq"]) == pytest.approx(float((p * p).sum(1).mean()), rel=1e-5)


def test_geometry_statistics_are_the_spreads_of_latents_and_centres():
    q = make_quantizer()
    z = latents()
    out = q(z)
    x = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    c = q.codebook.detach()
    assert float(out.stats["latent_spread"]) == pytest.approx(float((x - x.mean(0)).pow(2).sum(1).mean()), rel=1e-5)
    assert float(out.stats["codebook_spread"]) == pytest.approx(float((c - c.mean(0)).pow(2).sum(1).mean()), rel=1e-5)


@pytest.mark.parametrize("logits", ["euclidean", "dot"])
def test_straight_through_gain_is_the_mean_eigenvalue_of_the_soft_jacobian(logits):
    """ste_gain = mean_n tr(dq~_n / dx_n) / C, the Jacobian taken by autograd through the dense reference; 1 would be
    VQ's identity estimator; Euclidean logits give (2 / tau) tr Cov_p(c) / C."""
    q = make_quantizer(tau_start=0.3, tau_end=0.3, logits=logits)
    z = latents()
    x = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])[:12]
    c = q.codebook.detach()
    traces = []
    for token in x:
        jacobian = torch.autograd.functional.jacobian(
            lambda v: lgq_dense_reference(v[None], c, 0.3, logits=logits)["q_soft"][0], token)
        traces.append(torch.trace(jacobian) / x.shape[1])
    assert float(q.straight_through_gain(x, c)) == pytest.approx(float(torch.stack(traces).mean()), rel=1e-4)
    if logits == "euclidean":
        p = lgq_dense_reference(x, c, 0.3)["probs"]
        covariance_trace = p @ (c * c).sum(1) - (p @ c).pow(2).sum(1)
        assert float(q.straight_through_gain(x, c)) == pytest.approx(
            float((2 / 0.3) * covariance_trace.mean() / x.shape[1]), rel=1e-4)
    assert "ste_gain" in q(z).stats


def test_bad_inputs_raise_clear_errors():
    q = make_quantizer()
    with pytest.raises(ValueError, match="B, C, H, W"):
        q(torch.randn(8, 3, 3))
    with pytest.raises(ValueError, match="8 latent channels, got 4"):
        q(torch.randn(1, 4, 3, 3))
    bad = latents()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        q(bad)
    with pytest.raises(ValueError, match="K must be >= 2"):
        LGQuantizer(8, 1)
    with pytest.raises(ValueError, match="tau_start"):
        LGQuantizer(8, 4, tau_start=0.0)
    with pytest.raises(ValueError, match="tau_end"):
        LGQuantizer(8, 4, tau_end=-1.0)
    with pytest.raises(ValueError, match="'exponential'"):
        LGQuantizer(8, 4, tau_schedule="exponential")
    with pytest.raises(ValueError, match="'manhattan'"):
        LGQuantizer(8, 4, logits="manhattan")
    with pytest.raises(ValueError, match="'kmeans'"):
        LGQuantizer(8, 4, init="kmeans")
    with pytest.raises(ValueError, match="chunk_size"):
        LGQuantizer(8, 4, chunk_size=0)
    with pytest.raises(ValueError, match="bad options"):
        build_quantizer("lgq", 8, 4, temperature=1.0)
    with pytest.raises(ValueError, match="progress"):
        q.set_progress(float("nan"))
    with pytest.raises(ValueError, match=r"latents \[N >= 1, 8\]"):
        q.init_from_latents(torch.randn(10, 3))


def test_bf16_autocast_input_gives_fp32_math_and_finite_output():
    q = make_quantizer()
    z = latents().to(torch.bfloat16).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = q(z)
    assert out.quantized.dtype == torch.float32 and out.loss.dtype == torch.float32
    assert torch.isfinite(out.quantized).all() and torch.isfinite(out.loss)
    # same indices as fp32 math on the bf16-rounded input
    assert torch.equal(out.indices, q(z.detach().float()).indices)
    out.loss.backward()
    assert torch.isfinite(z.grad.float()).all() and torch.isfinite(q.codebook.grad).all()


def test_tiny_tau_stays_finite():
    q = make_quantizer(tau_start=1e-6, tau_end=1e-6)
    z = (latents() * 100).requires_grad_(True)
    out = q(z)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(z.grad).all() and torch.isfinite(q.codebook.grad).all()


@pytest.mark.parametrize("method", ["random", "kmeans++", "lloyd"])
def test_init_from_latents(method):
    q = make_quantizer(K=16, init=method)
    assert q.needs_init
    data = torch.randn(200, 8)
    q.init_from_latents(data)
    assert not q.needs_init
    if method in ("random", "kmeans++"):  # centres are actual latents
        gap = (q.codebook.detach()[:, None, :] - data[None]).abs().amax(-1).min(1).values
        assert float(gap.max()) < 1e-6
    # deterministic given latents and generator (same on every DDP rank)
    other = make_quantizer(K=16, init=method)
    torch.manual_seed(123)  # global RNG must not matter
    other.init_from_latents(data)
    assert torch.equal(other.codebook, q.codebook)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a, b = make_quantizer(K=16, init=method), make_quantizer(K=16, init=method)
    a.init_from_latents(data, generator=g1)
    b.init_from_latents(data, generator=g2)
    assert torch.equal(a.codebook, b.codebook)
    # initialised flag survives a state_dict round trip (a resumed run does not re-init)
    fresh = make_quantizer(K=16, init=method)
    fresh.load_state_dict(q.state_dict())
    assert not fresh.needs_init


def test_lloyd_init_lowers_quantization_error():
    torch.manual_seed(0)
    data = torch.randn(400, 8)
    errors = {}
    for method in ("random", "lloyd"):
        q = LGQuantizer(8, 16, init=method, tau_start=1e-3, tau_end=1e-3)
        q.init_from_latents(data)
        with torch.no_grad():
            errors[method] = float(q(data.t().reshape(1, 8, 1, 400)).stats["loss_quant"])
    assert errors["lloyd"] < errors["random"]


def test_init_with_fewer_latents_than_K_warns_and_adds_noise():
    q = make_quantizer(K=37)
    data = torch.randn(5, 8)
    with pytest.warns(UserWarning, match="only 5 latents for K=37"):
        q.init_from_latents(data)
    assert not q.needs_init
    assert torch.unique(q.codebook.detach(), dim=0).shape[0] == 37  # noise separates duplicates
    assert float(torch.cdist(q.codebook.detach(), data).min(1).values.max()) < 0.2


def test_dead_centre_reseeding():
    torch.manual_seed(0)
    q = LGQuantizer(4, 8, reseed_dead=True, reseed_threshold=0.5, usage_ema_decay=0.0,
                    tau_start=0.1, tau_end=0.1)
    with torch.no_grad():
        q.codebook.copy_(torch.randn(8, 4) * 0.1)
        q.codebook[0] = torch.tensor([10.0, 0, 0, 0])  # the only used centre
    z = (torch.tensor([10.0, 0, 0, 0]) + 0.01 * torch.randn(64, 4)).t().reshape(1, 4, 1, 64)
    q.train()
    out = q(z)  # ema <- current usage: only code 0 used
    assert float(out.stats["dead_codes"]) == 7
    q(z)  # re-seeds the 7 dead centres onto current latents
    assert (q.codebook.detach()[1:, 0] > 9).all()
    # off by default, and eval mode never re-seeds
    assert not make_quantizer().reseed_dead
    before = q.codebook.detach().clone()
    q.usage_ema.zero_()
    q.eval()
    q(z)
    assert torch.equal(before, q.codebook.detach())


def test_usage_floor_term_optional():
    q = make_quantizer(usage_floor=30.0, usage_floor_weight=0.01, tau_start=0.01, tau_end=0.01)
    out = q(latents())
    ppl = out.stats["soft_perplexity"]
    assert torch.allclose(out.stats["loss_usage_floor"], F.relu(30.0 - ppl) ** 2)
    base = out.stats["loss_quant"] + 0.005 * out.stats["loss_peak"] + 0.005 * out.stats["loss_usage"]
    assert torch.allclose(out.loss.detach(), base + 0.01 * out.stats["loss_usage_floor"], rtol=1e-5)


def test_auto_chunk_size_budget():
    assert auto_chunk_size(16384) == 1024 and auto_chunk_size(65536) == 256
    assert make_quantizer(K=37).chunk_size == auto_chunk_size(37)


def test_memory_of_backward_saves_no_N_by_K_tensor():
    """The autograd graph saves only x, c and per-token / per-code vectors."""
    q = LGQuantizer(4, 50, chunk_size=8)
    z = torch.randn(1, 4, 10, 10, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        q(z).loss.backward()
    assert saved and all(math.prod(s) < 100 * 50 for s in saved), saved


def test_soft_usage_matches_reference_and_is_a_distribution():
    q = make_quantizer(tau_start=0.5)
    z = latents()
    u = q.soft_usage(z)
    ref = lgq_dense_reference(flat(z), q.codebook.detach(), 0.5)["usage"]
    assert u.shape == (37,) and torch.allclose(u, ref, atol=1e-6)
    assert torch.allclose(u.sum(), torch.tensor(1.0), atol=1e-5)
    assert torch.allclose(q.codebook.shape[0] * (u * u).sum(), q(z).stats["loss_usage"], rtol=1e-5)
