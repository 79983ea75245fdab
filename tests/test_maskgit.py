"""MaskGIT prior and scheduler: masking, loss on masked positions only, decoding, CFG, save/load, validation."""
import math

import pytest
import torch
import torch.nn.functional as F

from prior.maskgit import MaskGITPrior
from prior.scheduler import MASK_SCHEDULES, MaskGITScheduler, mask_schedule, sample_categorical

K, C, GRID = 16, 4, 4


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny(**overrides):
    torch.manual_seed(0)
    kwargs = dict(codebook_size=K, num_classes=C, grid_size=GRID, hidden_size=32, num_layers=2, num_heads=4,
                  dropout=0.0, label_dropout=0.0)
    kwargs.update(overrides)
    return MaskGITPrior(**kwargs)


def gen(seed):
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- training
def test_unigram_output_bias_starts_the_prior_at_the_smoothed_token_frequencies():
    """b_k = log((c_k + 1) / (N + K)): with an untrained head input near 0, softmax(b) is the add-one smoothed
    unigram; codes never seen get 1 / (N + K)."""
    prior = tiny()
    counts = torch.zeros(K, dtype=torch.long)
    counts[:4] = torch.tensor([60, 30, 9, 1])
    prior.init_output_bias(counts.numpy())
    expected = (counts.double() + 1) / (counts.sum() + K)
    assert torch.allclose(prior.output_bias.double().softmax(0), expected, atol=1e-6)
    assert math.isclose(float(prior.output_bias[10]), math.log(1 / (100 + K)), rel_tol=1e-5)
    with pytest.raises(ValueError, match="one per code"):
        prior.init_output_bias(torch.ones(K + 1))
    with pytest.raises(ValueError, match="non-negative"):
        prior.init_output_bias(-torch.ones(K))


def test_mask_fraction_follows_cosine_schedule():
    model = tiny(grid_size=8)
    L = 64
    tokens = torch.zeros(4000, L, dtype=torch.long)
    masked, mask, ratio = model.mask_tokens(tokens, gen(0))
    counts = mask.sum(1)
    assert torch.equal(counts, torch.ceil(ratio * L).long().clamp(1, L))
    assert torch.equal(masked == K, mask) and (masked[~mask] == 0).all()
    fraction = counts.float() / L
    # E[cos(pi u / 2)] = 2 / pi; ceil adds at most 1/L
    assert abs(fraction.mean().item() - 2 / math.pi) < 0.02
    # CDF of r = cos(pi u / 2): P(r <= x) = 1 - (2 / pi) arccos(x)
    for x in (0.25, 0.5, 0.75):
        expected = 1 - 2 / math.pi * math.acos(x)
        assert abs((ratio <= x).float().mean().item() - expected) < 0.03


def test_masking_loss_is_cross_entropy_on_masked_positions_only():
    model = tiny().eval()
    tokens = torch.randint(0, K, (6, GRID, GRID), generator=gen(1))
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    loss, logs = model.masking_loss(tokens, labels, generator=gen(7))

    flat = tokens.view(6, -1)
    masked, mask, _ = model.mask_tokens(flat, gen(7))
    assert 0 < mask.sum() < mask.numel()
    with torch.no_grad():
        logits = model(masked, labels)
    per_token = F.cross_entropy(logits.transpose(1, 2), flat, reduction="none")
    assert torch.allclose(loss, per_token[mask].mean(), atol=1e-6)
    # the upstream bugs: loss over all tokens, or over the unmasked ones (inverted mask)
    assert not torch.allclose(loss, per_token.mean(), atol=1e-4)
    assert not torch.allclose(loss, per_token[~mask].mean(), atol=1e-4)
    assert abs(logs["mask_ratio"].item() - mask.float().mean().item()) < 1e-6


def test_masked_cross_entropy_ignores_unmasked_logits():
    logits = torch.randn(3, 10, K, generator=gen(2))
    targets = torch.randint(0, K, (3, 10), generator=gen(3))
    mask = torch.rand(3, 10, generator=gen(4)) < 0.5
    base = MaskGITPrior.masked_cross_entropy(logits, targets, mask)
    changed_unmasked = logits + 100 * torch.randn_like(logits) * (~mask).unsqueeze(-1)
    assert torch.allclose(MaskGITPrior.masked_cross_entropy(changed_unmasked, targets, mask), base)
    changed_masked = logits + 5 * torch.randn_like(logits) * mask.unsqueeze(-1)
    assert not torch.allclose(MaskGITPrior.masked_cross_entropy(changed_masked, targets, mask), base)


def test_gradients_flow_only_from_masked_positions():
    model = tiny().eval()
    tokens = torch.randint(0, K, (2, GRID * GRID), generator=gen(5))
    masked, mask, _ = model.mask_tokens(tokens, gen(6))
    logits = model(masked, torch.tensor([0, 1])).detach().requires_grad_(True)
    MaskGITPrior.masked_cross_entropy(logits, tokens, mask).backward()
    assert (logits.grad[~mask] == 0).all() and (logits.grad[mask].abs().sum(-1) > 0).all()


def test_label_dropout_only_in_training_mode():
    model = tiny(label_dropout=0.5)
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(args[1].clone()))
    tokens = torch.randint(0, K, (400, GRID, GRID), generator=gen(8))
    labels = torch.randint(0, C, (400,), generator=gen(9))
    model.train()
    model.masking_loss(tokens, labels, generator=gen(10))
    dropped = (seen[-1] == C).float().mean().item()
    assert 0.4 < dropped < 0.6
    assert torch.equal(seen[-1][seen[-1] != C], labels[seen[-1] != C])
    model.eval()
    model.masking_loss(tokens, labels, generator=gen(10))
    assert torch.equal(seen[-1], labels)


def test_tiny_maskgit_overfits_a_few_grids_and_regenerates_them():
    model = tiny(hidden_size=64)
    data = torch.randint(0, K, (4, GRID, GRID), generator=gen(11))
    labels = torch.arange(4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = gen(12)
    for _ in range(250):
        loss, _ = model.masking_loss(data, labels, generator=g)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        eval_loss = sum(model.masking_loss(data, labels, generator=gen(s))[0].item() for s in range(8)) / 8
    assert eval_loss < 0.05 * math.log(K)
    samples = model.generate(labels, num_inference_steps=8, generator=gen(13))
    assert (samples == data).float().mean().item() > 0.9


# ----------------------------------------------------------------------------- scheduler
def test_mask_schedules_are_monotone_from_one_to_zero():
    r = torch.linspace(0, 1, 101)
    for name in MASK_SCHEDULES:
        g = mask_schedule(r, name)
        assert g[0].item() == pytest.approx(1.0) and g[-1].item() == pytest.approx(0.0, abs=1e-12)
        assert (g[1:] <= g[:-1] + 1e-12).all()
    with pytest.raises(ValueError, match="mask schedule"):
        mask_schedule(0.5, "quadratic")


@pytest.mark.parametrize("schedule", MASK_SCHEDULES)
@pytest.mark.parametrize("steps", [1, 5, 12])
def test_scheduler_step_follows_schedule_and_never_changes_fixed_tokens(schedule, steps):
    L, B = 20, 3
    scheduler = MaskGITScheduler(codebook_size=K, mask_schedule=schedule)
    scheduler.set_timesteps(steps)
    tokens = torch.full((B, L), K)
    g = gen(14)
    for t in scheduler.timesteps.tolist():
        logits = torch.randn(B, L, K, generator=g) * 3
        before = tokens.clone()
        tokens = scheduler.step(logits, t, tokens, generator=g).prev_sample
        fixed_before = before != K
        assert torch.equal(tokens[fixed_before], before[fixed_before])
        still_masked = (tokens == K).sum(1)
        if t == steps - 1:
            assert (still_masked == 0).all()
        else:
            n_unknown = (before == K).sum(1)
            target = math.floor(L * float(mask_schedule((t + 1) / steps, schedule)) + 1e-9)
            expected = torch.clamp(torch.full_like(n_unknown, target), min=1)
            expected = torch.minimum(expected, n_unknown - 1)
            assert torch.equal(still_masked, expected)
        assert ((tokens >= 0) & (tokens <= K)).all()
    assert (tokens < K).all()


def test_scheduler_keeps_the_most_confident_tokens_without_noise():
    scheduler = MaskGITScheduler(codebook_size=K, choice_temperature=0.0)
    scheduler.set_timesteps(2)  # cosine: after step 0, floor(8 * cos(pi/4)) = 5 stay masked
    logits = torch.full((1, 8, K), -1e4)
    support = torch.tensor([7, 1, 6, 2, 5, 8, 4, 3])  # position i: uniform over support[i] tokens, p = 1/support[i]
    for i, m in enumerate(support.tolist()):
        logits[0, i, :m] = 0.0
    out = scheduler.step(logits, 0, torch.full((1, 8), K), generator=gen(0)).prev_sample
    unmasked = (out[0] != K).nonzero().flatten().tolist()
    confidence_order = -support
    assert sorted(unmasked) == sorted(confidence_order.argsort(descending=True)[:3].tolist())


def test_sample_categorical_draws_from_the_given_probabilities(monkeypatch):
    import prior.scheduler

    monkeypatch.setattr(prior.scheduler, "CDF_CHUNK_BYTES", 8 * 5 * 1000)  # several chunks of 1000 rows
    p = torch.tensor([0.1, 0.0, 0.5, 0.15, 0.25])
    n = 200_000
    draws = sample_categorical(3.0 * p.expand(n, 5), gen(0))  # unnormalised rows: P(k) = p_k / sum p
    assert draws.shape == (n,) and draws.dtype == torch.long
    frequencies = torch.bincount(draws, minlength=5).double() / n
    assert frequencies[1] == 0  # zero probability is never drawn
    assert torch.allclose(frequencies, p.double(), atol=0.005)  # 5 standard deviations at n = 200k
    assert torch.equal(draws, sample_categorical(p.expand(n, 5), gen(0)))  # seeded; the scale does not matter
    last_only = torch.zeros(4, 3, K)
    last_only[..., -1] = 1.0
    assert (sample_categorical(last_only, gen(1)) == K - 1).all()
    assert sample_categorical(torch.zeros(0, K), gen(1)).shape == (0,)


def test_scheduler_step_with_masked_position_logits_equals_step_with_all_logits():
    scheduler = MaskGITScheduler(codebook_size=K)
    scheduler.set_timesteps(4)
    tokens = torch.randint(0, K, (3, 8), generator=gen(1))
    tokens[torch.rand(3, 8, generator=gen(2)) < 0.6] = K  # a partly decoded grid
    unknown = tokens == K
    logits = torch.randn(3, 8, K, generator=gen(3))
    logits[~unknown] = float("nan")  # the fixed positions' logits must never be read
    full = scheduler.step(logits, 1, tokens, generator=gen(4))
    masked_only = scheduler.step(logits[unknown], 1, tokens, generator=gen(4))
    assert torch.equal(full.prev_sample, masked_only.prev_sample)
    assert torch.equal(full.pred_original_sample, masked_only.pred_original_sample)
    assert torch.equal(full.pred_original_sample[~unknown], tokens[~unknown])  # fixed tokens are kept
    with pytest.raises(ValueError, match="one row per masked token"):
        scheduler.step(logits[unknown][1:], 1, tokens, generator=gen(4))


def test_forward_on_selected_positions_equals_the_full_forward_at_those_positions():
    model = tiny().eval()
    tokens = torch.randint(0, K + 1, (2, GRID * GRID), generator=gen(5))
    positions = tokens == K
    assert 0 < int(positions.sum()) < positions.numel()
    labels = torch.tensor([1, 2])
    with torch.no_grad():
        assert torch.allclose(model(tokens, labels, positions), model(tokens, labels)[positions], atol=1e-6)
        guided = model.guided_logits(tokens, labels, 2.5, positions)
        assert torch.allclose(guided, model.guided_logits(tokens, labels, 2.5)[positions], atol=1e-5)
    with pytest.raises(ValueError, match="bool mask"):
        model(tokens, labels, positions.long())


def test_scheduler_validates_inputs_and_round_trips(tmp_path):
    scheduler = MaskGITScheduler(codebook_size=K, mask_schedule="arccos", choice_temperature=2.0)
    with pytest.raises(RuntimeError, match="set_timesteps"):
        scheduler.step(torch.zeros(1, 4, K), 0, torch.full((1, 4), K))
    scheduler.set_timesteps(4)
    with pytest.raises(ValueError, match="codebook_size"):
        scheduler.step(torch.zeros(1, 4, K + 1), 0, torch.full((1, 4), K))
    with pytest.raises(ValueError, match="timestep"):
        scheduler.step(torch.zeros(1, 4, K), 4, torch.full((1, 4), K))
    with pytest.raises(ValueError, match="mask schedule"):
        MaskGITScheduler(codebook_size=K, mask_schedule="nope")
    scheduler.save_pretrained(tmp_path)
    assert (tmp_path / "scheduler_config.json").is_file()
    loaded = MaskGITScheduler.from_pretrained(tmp_path)
    assert loaded.config.mask_schedule == "arccos" and loaded.config.choice_temperature == 2.0
    assert loaded.mask_id == K


# ----------------------------------------------------------------------------- sampling
@pytest.mark.parametrize("schedule", ["cosine", "linear", "arccos"])
def test_generate_returns_valid_grids_and_is_seeded(schedule):
    model = tiny(grid_size=(2, 3)).eval()
    a = model.generate([0, 3, 1], num_inference_steps=4, schedule=schedule, guidance_scale=2.0, generator=gen(3))
    b = model.generate([0, 3, 1], num_inference_steps=4, schedule=schedule, guidance_scale=2.0, generator=gen(3))
    assert a.shape == (3, 2, 3) and a.dtype == torch.long
    assert ((a >= 0) & (a < K)).all()
    assert torch.equal(a, b)
    c = model.generate([0, 3, 1], num_inference_steps=4, schedule=schedule, guidance_scale=2.0, generator=gen(4))
    assert not torch.equal(a, c)


def test_classifier_free_guidance_convention():
    """l = l_u + s (l_c - l_u): s = 1 is the conditional model, s = 0 the unconditional one."""
    model = tiny().eval()
    tokens = torch.randint(0, K + 1, (2, GRID * GRID), generator=gen(5))
    labels = torch.tensor([1, 2])
    with torch.no_grad():
        cond = model(tokens, labels)
        uncond = model(tokens, torch.full_like(labels, C))
        assert torch.allclose(model.guided_logits(tokens, labels, 1.0), cond)
        assert torch.allclose(model.guided_logits(tokens, labels, 0.0), uncond)
        assert torch.allclose(model.guided_logits(tokens, labels, 2.5), uncond + 2.5 * (cond - uncond), atol=1e-5)
        assert torch.allclose(model.guided_logits(tokens, labels, 0.5), (cond + uncond) / 2, atol=1e-5)
    # guidance 0 ignores the class: every label gives the same samples for the same seed
    a = model.generate([0, 0], guidance_scale=0.0, num_inference_steps=4, generator=gen(6))
    b = model.generate([3, 2], guidance_scale=0.0, num_inference_steps=4, generator=gen(6))
    assert torch.equal(a, b)
    # a linear guidance schedule is accepted and still seeded
    s1 = model.generate([1, 2], guidance_scale=3.0, guidance_schedule="linear", num_inference_steps=4, generator=gen(6))
    s2 = model.generate([1, 2], guidance_scale=3.0, guidance_schedule="linear", num_inference_steps=4, generator=gen(6))
    assert torch.equal(s1, s2)


def test_generate_with_an_explicit_scheduler_and_mismatch():
    model = tiny().eval()
    scheduler = MaskGITScheduler(codebook_size=K, mask_schedule="linear")
    out = model.generate([1], num_inference_steps=3, scheduler=scheduler, generator=gen(0))
    assert out.shape == (1, GRID, GRID) and (out < K).all()
    with pytest.raises(ValueError, match="codebook_size"):
        model.generate([1], scheduler=MaskGITScheduler(codebook_size=K * 2))


def test_save_load_round_trip(tmp_path):
    model = tiny(grid_size=(2, 4)).eval()
    model.save_pretrained(tmp_path)
    loaded = MaskGITPrior.from_pretrained(tmp_path).eval()
    assert loaded.grid_size == (2, 4) and loaded.codebook_size == K and loaded.num_classes == C
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    assert torch.equal(model.generate([0, 1], num_inference_steps=3, generator=gen(1)),
                       loaded.generate([0, 1], num_inference_steps=3, generator=gen(1)))


def test_input_validation():
    model = tiny()
    tokens = torch.randint(0, K, (2, GRID, GRID))
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        model.generate([0, 4])
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        model.generate([-1])
    with pytest.raises(ValueError, match="integers"):
        model.generate(torch.tensor([0.5, 1.0]))
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        model.masking_loss(tokens, torch.tensor([0, 4]))
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        model.masking_loss(tokens.clone().fill_(K), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="mask id"):
        model(tokens.clone().fill_(K + 1), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="shape"):
        model(torch.zeros(2, 5, 5, dtype=torch.long), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="integer"):
        model(tokens.float(), torch.tensor([0, 1]))


def test_gumbel_noise_is_finite_and_gumbel_distributed():
    from prior.scheduler import gumbel_noise

    noise = gumbel_noise((200000,), gen(0), torch.device("cpu"))
    assert torch.isfinite(noise).all()
    assert abs(noise.mean().item() - 0.5772) < 0.02  # Euler-Mascheroni constant
    assert abs(noise.var().item() - math.pi**2 / 6) < 0.05


def test_scheduler_step_draws_and_ranks_as_the_log_softmax_of_the_tempered_logits():
    """The fused step (tail-dropped exp in place, log p(x) = log p~_x - log F) decodes as the textbook rule:
    x ~ softmax(l / T), confidence log_softmax(l / T)_x, the least confident re-masked."""
    from prior.scheduler import gumbel_noise

    K_big, temperature = 300, 0.7
    tokens = torch.full((4, 16), K_big)
    tokens[:, :3] = 5  # three fixed tokens per row
    logits = 4.0 * torch.randn(4, 16, K_big, generator=gen(11))
    for choice_temperature in (0.0, 3.0):
        scheduler = MaskGITScheduler(codebook_size=K_big, choice_temperature=choice_temperature)
        scheduler.set_timesteps(3)
        out = scheduler.step(logits, 0, tokens, generator=gen(12), temperature=temperature)
        # the textbook rule with the same random stream (draws first, then the Gumbel noise)
        unknown = tokens == K_big
        log_probs = torch.log_softmax(logits[unknown] / temperature, dim=-1)
        g = gen(12)
        drawn = sample_categorical(log_probs.exp(), g, unknown.sum(1))
        confidence_masked = log_probs.gather(-1, drawn[:, None]).squeeze(-1)
        noise_scale = choice_temperature * (1 - 1 / 3)
        if noise_scale > 0:
            confidence_masked = confidence_masked + noise_scale * gumbel_noise(confidence_masked.shape, g, "cpu",
                                                                               rows_per_sample=unknown.sum(1))
        confidence = torch.full(tokens.shape, float("inf")).masked_scatter(unknown, confidence_masked)
        keep = min(max(scheduler.num_masked_after(0, 16), 1), 13 - 1)  # clipped to [1, n_unknown - 1]
        remasked = confidence.argsort(dim=1, stable=True)[:, :keep]
        expected = tokens.masked_scatter(unknown, drawn).scatter(1, remasked, K_big)
        assert torch.equal(out.pred_original_sample, tokens.masked_scatter(unknown, drawn))
        assert torch.equal(out.prev_sample, expected)
