"""Baseline quantizers (VQ, FSQ, SimVQ, LFQ; LGQ when present) behind the shared interface."""
import math

import pytest
import torch
import torch.nn.functional as F

from tokenizer.quantizers import build_quantizer
from tokenizer.quantizers.fsq import FSQ_LEVELS, FSQuantizer
from tokenizer.quantizers.ibq import IBQuantizer
from tokenizer.quantizers.lfq import LFQuantizer, binary_entropy
from tokenizer.quantizers.simvq import SimVQuantizer
from tokenizer.quantizers.base import nearest_code_indices
from tokenizer.quantizers.vq import VectorQuantizer

DIM, K = 8, 64
NAMES = ["vq", "fsq", "simvq", "lfq", "ibq", "lgq"]
OPTIONS = {"fsq": {"levels": [4, 4, 4]}}  # K = 64 is not in the FSQ table
LOSS_TERMS = {
    "vq": ("loss_codebook", "loss_commit"),
    "simvq": ("loss_codebook", "loss_commit"),
    "fsq": (),
    "lfq": ("entropy_per_sample", "entropy_codebook", "loss_entropy", "loss_commit"),
    "ibq": ("loss_double", "loss_commit", "loss_codebook", "loss_entropy", "entropy_per_sample", "entropy_codebook"),
    "lgq": ("loss_quant", "loss_peak", "loss_usage"),
}


def make(name, dim=DIM, K=K, **kw):
    if name == "lgq":
        pytest.importorskip("tokenizer.quantizers.lgq", reason="tokenizer/quantizers/lgq.py not present yet")
    torch.manual_seed(0)
    return build_quantizer(name, dim=dim, codebook_size=K, **{**OPTIONS.get(name, {}), **kw})


def latents(B=2, C=DIM, H=3, W=5, seed=1, **kw):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, C, H, W, generator=g, **kw)


def flat(z):
    return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])


# ----------------------------------------------------------------------------- shared interface
@pytest.mark.parametrize("name", NAMES)
def test_shapes_dtypes_range_and_stats(name):
    q = make(name)
    assert q.codebook_size == K and q.dim == DIM
    out = q(latents())
    assert out.quantized.shape == (2, DIM, 3, 5) and out.quantized.dtype == torch.float32
    assert out.indices.shape == (2, 3, 5) and out.indices.dtype == torch.int64
    assert int(out.indices.min()) >= 0 and int(out.indices.max()) < K
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    for key in ("perplexity", "active_codes", *LOSS_TERMS[name]):
        assert key in out.stats, key
        assert out.stats[key].dim() == 0 and not out.stats[key].requires_grad and torch.isfinite(out.stats[key])
    counts = torch.bincount(out.indices.reshape(-1), minlength=K)
    assert out.stats["active_codes"] == (counts > 0).sum()
    assert 1.0 <= float(out.stats["perplexity"]) <= float(out.stats["active_codes"]) + 1e-4


@pytest.mark.parametrize("name", NAMES)
def test_indices_to_latents_equals_quantized_forward_value(name):
    q = make(name).eval()
    out = q(latents())
    assert torch.allclose(q.indices_to_latents(out.indices), out.quantized, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="indices must lie in"):
        q.indices_to_latents(torch.full((1, 2, 2), K))
    with pytest.raises(ValueError, match=r"\[B, H, W\]"):
        q.indices_to_latents(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        q.indices_to_latents(torch.zeros(1, 2, 2))


@pytest.mark.parametrize("name", NAMES)
def test_gradient_reaches_input_and_every_learnable_parameter(name):
    q = make(name)
    z = latents(requires_grad=True)
    out = q(z)
    (out.quantized.pow(2).sum() + out.loss).backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    learnable = [(n, p) for n, p in q.named_parameters() if p.requires_grad]
    assert learnable, "every quantizer here has something to learn"
    for param_name, param in learnable:
        assert param.grad is not None and param.grad.abs().sum() > 0, param_name


@pytest.mark.parametrize("name", NAMES)
def test_bad_inputs_raise_clear_errors(name):
    q = make(name)
    with pytest.raises(ValueError, match="expects latents"):
        q(torch.randn(2, DIM, 4))
    with pytest.raises(ValueError, match="latent channels"):
        q(torch.randn(2, DIM + 1, 3, 3))
    bad = latents()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        q(bad)
    with pytest.raises(ValueError, match="K must be >= 2"):
        build_quantizer(name, dim=DIM, codebook_size=1)
    with pytest.raises(ValueError, match="bad options"):
        build_quantizer(name, dim=DIM, codebook_size=K, no_such_option=3)


@pytest.mark.parametrize("name", NAMES)
def test_bf16_autocast_input_gives_finite_fp32_output(name):
    q = make(name)
    z = latents().bfloat16().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = q(z)
    assert out.quantized.dtype == torch.float32 and torch.isfinite(out.quantized).all()
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    (out.quantized.sum() + out.loss).backward()
    assert torch.isfinite(z.grad.float()).all()
    # fp32 math: same indices as the fp32 forward on the (bf16-rounded) input outside autocast
    assert torch.equal(out.indices, q(z.detach().float()).indices)


@pytest.mark.parametrize("name", ["vq", "fsq", "simvq", "lfq", "ibq"])
def test_build_quantizer_returns_the_registered_class(name):
    expected = {"vq": VectorQuantizer, "fsq": FSQuantizer, "simvq": SimVQuantizer, "lfq": LFQuantizer,
                "ibq": IBQuantizer}[name]
    assert type(make(name)) is expected
    assert type(build_quantizer(name.upper(), dim=DIM, codebook_size=K, **OPTIONS.get(name, {}))) is expected


@pytest.mark.parametrize("name", ["vq", "fsq", "simvq", "lfq"])
def test_straight_through_gradient_is_identity_in_the_lookup_space(name):
    """d quantized / d z without the loss: identity (VQ, SimVQ) or P_out (STE) P_in (FSQ: times tanh')."""
    q = make(name)
    z = latents(requires_grad=True)
    q(z).quantized.sum().backward()
    if name in ("vq", "simvq"):
        assert torch.equal(z.grad, torch.ones_like(z))
    elif name == "lfq":  # d/dz sum P_out(u) = P_in^T P_out^T 1, the same for every token
        expected = q.project_in.weight.t() @ q.project_out.weight.t() @ torch.ones(DIM)
        assert torch.allclose(flat(z.grad), expected.expand(30, DIM), atol=1e-5)
    else:
        assert z.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["vq", "simvq", "lfq", "ibq"])
def test_backward_saves_no_tokens_by_codes_tensor(name):
    """Memory: what is kept for backward is O(N (C + b) + K C), far below N x K (N = 120 tokens, K = 1024)."""
    q = make(name, K=1024, chunk_size=8)
    z = latents(B=2, H=6, W=10, requires_grad=True)
    saved = {}  # distinct saved storages -> element count

    def pack(tensor):
        saved[(tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.numel())] = tensor.numel()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = q(z)
    (out.quantized.sum() + out.loss).backward()
    assert saved and sum(saved.values()) < 120 * 1024 // 3, sorted(saved.values())
    assert z.grad is not None and torch.isfinite(z.grad).all()


# ----------------------------------------------------------------------------- nearest neighbour
def test_nearest_code_indices_is_brute_force_argmin_and_chunk_invariant():
    g = torch.Generator().manual_seed(0)
    x, codes = torch.randn(50, 6, generator=g), torch.randn(17, 6, generator=g)
    brute = torch.cdist(x, codes).argmin(1)
    for chunk in (1, 7, 50, 1000):
        assert torch.equal(nearest_code_indices(x, codes, chunk), brute)


@pytest.mark.parametrize("options", [{}, {"codebook_dim": 4, "l2_normalize": True}, {"l2_normalize": True}])
def test_vq_hard_index_is_nearest_code_and_losses(options):
    q = make("vq", chunk_size=4, **options)
    z = latents(B=3)
    out = q(z)
    e = q.lookup_latents(flat(z))
    codes = q.lookup_codes()
    brute = torch.stack([((e[n] - codes) ** 2).sum(1).argmin() for n in range(e.shape[0])])
    assert torch.equal(out.indices.reshape(-1), brute)
    mse = F.mse_loss(e, codes[brute])
    assert torch.allclose(out.stats["loss_commit"], mse) and torch.allclose(out.stats["loss_codebook"], mse)
    assert torch.allclose(out.loss, 1.25 * mse)
    if options.get("l2_normalize"):
        assert torch.allclose(codes.norm(dim=1), torch.ones(K), atol=1e-5)
    if "codebook_dim" in options:
        assert q.codebook.shape == (K, 4)
        assert torch.allclose(flat(out.quantized), q.project_out(codes[brute]), atol=1e-6)
    else:
        assert torch.allclose(flat(out.quantized), codes[brute], atol=1e-6)


def test_simvq_hard_index_is_nearest_transformed_code_and_codebook_is_frozen():
    q = make("simvq")
    z = latents(B=3)
    out = q(z)
    codes = q.frozen_codebook @ q.codebook_map.weight.t()
    brute = torch.stack([((x - codes) ** 2).sum(1).argmin() for x in flat(z)])
    assert torch.equal(out.indices.reshape(-1), brute)
    assert torch.allclose(flat(out.quantized), codes[brute], atol=1e-6)
    mse = F.mse_loss(flat(z), codes[brute])
    assert torch.allclose(out.loss, 1.25 * mse, atol=1e-6)
    names = dict(q.named_parameters())
    assert "frozen_codebook" not in names and set(names) == {"codebook_map.weight"}
    assert "frozen_codebook" in q.state_dict()
    other = SimVQuantizer(DIM, K)
    assert torch.equal(other.frozen_codebook, q.frozen_codebook)  # deterministic from the seed
    assert not torch.equal(SimVQuantizer(DIM, K, seed=1).frozen_codebook, q.frozen_codebook)


# ----------------------------------------------------------------------------- VQ options
def test_vq_ema_moves_codes_towards_assigned_latents():
    q = make("vq", K=4, dim=2, ema=True, ema_decay=0.5)
    assert not q.codebook.requires_grad
    q.codebook.data = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    q.ema_code_sum.copy_(q.codebook.data)
    targets = torch.tensor([[3.0, 0.5], [0.5, 3.0], [-3.0, -0.5], [-0.5, -3.0]])
    z = targets.repeat(8, 1).reshape(2, 4, 4, 2).permute(0, 3, 1, 2)  # 8 latents per cluster
    before = (q.codebook.data - targets).norm(dim=1)
    out = q.train()(z)
    assert torch.allclose(out.loss, 0.25 * out.stats["loss_commit"])  # no codebook loss term with EMA
    after = (q.codebook.data - targets).norm(dim=1)
    assert (after < before).all()
    # exact EMA step: N = 0.5 * 1 + 0.5 * 8, m = 0.5 * c + 0.5 * 8 t, Laplace smoothing ~ identity here
    expected = (0.5 * torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]) + 4 * targets) / 4.5
    assert torch.allclose(q.codebook.data, expected, atol=1e-4)
    for _ in range(30):
        q(z)
    assert torch.allclose(q.codebook.data, targets, atol=1e-3)
    frozen = q.codebook.data.clone()
    q.eval()(z + 1.0)
    assert torch.equal(q.codebook.data, frozen)  # no updates in eval mode


def test_vq_dead_codes_are_reseeded_from_current_latents():
    q = make("vq", reseed_dead=True, reseed_threshold=0.5).train()
    q.usage_ema.fill_(1.0 / K)
    q.usage_ema[:5] = 0.0
    z = latents()
    out = q(z)
    reseeded = q.codebook.data[:5]
    x = flat(z)
    assert all(((x - code).abs().amax(1) < 1e-6).any() for code in reseeded)
    assert "dead_codes" in out.stats
    assert torch.allclose(q.usage_ema.sum(), torch.tensor(1.0), atol=1e-5)


@pytest.mark.parametrize("name", ["vq", "ibq"])
def test_init_from_latents_random_sample(name):
    """VQ and IBQ get the data-driven init LGQ gets: K distinct encoder latents become the codes."""
    q = make(name, init="random")
    assert q.needs_init
    x = torch.randn(200, DIM)
    q.init_from_latents(x)
    assert not q.needs_init
    assert all(((x - code).abs().amax(1) < 1e-6).any() for code in q.codebook.data)
    assert torch.unique(q.codebook.data, dim=0).shape[0] == K
    assert make(name).needs_init and make(name).init == "random"  # default: data-driven init
    assert not make(name, init="none").needs_init
    with pytest.raises(ValueError, match="latents"):
        q.init_from_latents(torch.randn(10, DIM + 1))
    with pytest.raises(ValueError, match="NaN or Inf"):
        q.init_from_latents(torch.full((10, DIM), float("nan")))
    with pytest.raises(ValueError, match="init"):
        make(name, init="kmeans")
    few = make(name)
    few.init_from_latents(torch.randn(3, DIM))  # fewer latents than codes: with replacement + noise, all distinct
    assert torch.unique(few.codebook.data, dim=0).shape[0] == K
    same = make(name)
    same.init_from_latents(torch.ones(3, DIM))  # identical latents: the noise floor still separates the codes
    assert torch.unique(same.codebook.data, dim=0).shape[0] == K


def test_ibq_data_init_spreads_layernormed_latents_over_the_codes():
    """IBQ picks argmax_k x . c_k. For LayerNorm'd latents (all of norm sqrt(C)) initialised into the codebook,
    each such latent has its own code as the unique maximiser (Cauchy-Schwarz), so all K codes are used;
    the release's small random codes put these latents on far fewer codes."""
    torch.manual_seed(0)
    x = F.layer_norm(torch.randn(K, DIM) + 2.0 * torch.randn(1, DIM), (DIM,))  # a shared direction, as early on
    q = make("ibq").eval()
    q.init_from_latents(x)
    indices = q(x.t().reshape(1, DIM, 1, K)).indices.reshape(-1)
    assert torch.equal(indices.sort().values, torch.arange(K))  # every code used once ...
    assert torch.allclose(q.codebook[indices], x, atol=1e-6)  # ... by the latent it was copied from
    release = make("ibq", init="none").eval()
    assert torch.unique(release(x.t().reshape(1, DIM, 1, K)).indices).numel() < K


def test_weights_saved_before_the_init_buffer_load_as_initialised():
    """Old IBQ weights have no ``initialised`` entry: they load (strict) and are not re-initialised."""
    trained = make("ibq")
    trained.init_from_latents(torch.randn(100, DIM))
    old_state = {k: v for k, v in trained.state_dict().items() if k != "initialised"}
    fresh = make("ibq")
    assert fresh.needs_init
    fresh.load_state_dict(old_state)
    assert not fresh.needs_init and torch.equal(fresh.codebook, trained.codebook)


def test_vq_option_errors():
    for options, match in (({"beta": -1.0}, "beta"), ({"ema_decay": 1.0}, "ema_decay"), ({"codebook_dim": 0}, "codebook_dim"),
                           ({"init": "kmeans"}, "init"), ({"chunk_size": 0}, "chunk_size")):
        with pytest.raises(ValueError, match=match):
            build_quantizer("vq", dim=DIM, codebook_size=K, **options)


# ----------------------------------------------------------------------------- FSQ
@pytest.mark.parametrize("codebook_size", sorted(FSQ_LEVELS))
def test_fsq_every_table_entry_constructs_and_round_trips(codebook_size):
    q = FSQuantizer(DIM, codebook_size)
    assert math.prod(q.levels) == codebook_size and q.levels == FSQ_LEVELS[codebook_size]
    indices = torch.arange(codebook_size) if codebook_size <= 4096 else torch.randperm(codebook_size)[:4096]
    codes = q.indices_to_codes(indices)
    assert codes.shape == (indices.numel(), len(q.levels))
    assert codes.min() >= -1 and codes.max() <= 1
    assert torch.equal(q.codes_to_indices(codes), indices)
    if codebook_size <= 4096:
        assert torch.unique(codes, dim=0).shape[0] == codebook_size
    out = q.eval()(latents())
    assert int(out.indices.max()) < codebook_size
    assert torch.allclose(q.indices_to_latents(out.indices), out.quantized, atol=1e-6, rtol=0)


@pytest.mark.parametrize("levels", [[8, 5, 5, 5], [16, 8, 8, 8], [2, 3, 7]])
def test_fsq_bound_reaches_exactly_the_levels_and_zero_maps_to_zero(levels):
    q = FSQuantizer(DIM, math.prod(levels), levels=levels)
    y = torch.linspace(-20, 20, 4001)[:, None].expand(-1, len(levels))
    rounded = torch.round(q.bound(y))
    for j, level in enumerate(levels):
        values = torch.unique(rounded[:, j])
        assert values.numel() == level
        assert values.min() == -(level // 2) and values.max() == level - 1 - level // 2
    assert torch.allclose(q.bound(torch.zeros(1, len(levels))), torch.zeros(1, len(levels)), atol=1e-6)


def test_fsq_forward_indices_match_mixed_radix_of_rounded_bound():
    q = FSQuantizer(DIM, 1000)  # levels [8, 5, 5, 5]
    z = latents()
    out = q(z)
    rounded = torch.round(q.bound(q.project_in(flat(z))))
    digits = rounded.long() + torch.tensor([4, 2, 2, 2])
    expected = digits[:, 0] + 8 * digits[:, 1] + 40 * digits[:, 2] + 200 * digits[:, 3]
    assert torch.equal(out.indices.reshape(-1), expected)
    assert out.loss == 0


def test_fsq_level_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"product 60.*codebook_size=64"):
        build_quantizer("fsq", dim=DIM, codebook_size=64, levels=[5, 4, 3])
    with pytest.raises(ValueError, match=r"no default levels for codebook_size=100.*16384: \[8, 8, 8, 8, 4\]"):
        build_quantizer("fsq", dim=DIM, codebook_size=100)
    with pytest.raises(ValueError, match=">= 2"):
        build_quantizer("fsq", dim=DIM, codebook_size=64, levels=[64, 1])


# ----------------------------------------------------------------------------- LFQ
def test_lfq_bits_round_trip_and_sign_quantization():
    q = LFQuantizer(6, 64)
    indices = torch.arange(64)
    bits = q.indices_to_bits(indices)
    assert torch.equal((bits.long() * 2 ** torch.arange(6)).sum(1), indices)
    with torch.no_grad():  # make u = z so the signs are known
        q.project_in.weight.copy_(torch.eye(6))
        q.project_in.bias.zero_()
    z = torch.randn(2, 6, 4, 4)
    out = q(z)
    expected = ((flat(z) > 0).long() * 2 ** torch.arange(6)).sum(1)
    assert torch.equal(out.indices.reshape(-1), expected)
    assert torch.allclose(flat(out.quantized), q.project_out(torch.sign(flat(z))), atol=1e-6)


def dense_lfq_entropies(u, temperature):
    """Reference over the full N x K soft assignment softmax(-||u - c||^2 / T)."""
    b = u.shape[1]
    codes = 2.0 * ((torch.arange(2**b)[:, None] >> torch.arange(b)) % 2).float() - 1.0
    p = torch.softmax(-torch.cdist(u, codes) ** 2 / temperature, dim=1)
    per_sample = -(p * p.clamp_min(1e-30).log()).sum(1).mean()
    mean_p = p.mean(0)
    return per_sample, -(mean_p * mean_p.clamp_min(1e-30).log()).sum()


@pytest.mark.parametrize("chunk_size", [3, None])
def test_lfq_entropy_matches_dense_reference_values_and_gradients(chunk_size):
    q = LFQuantizer(DIM, 32, temperature=2.0, chunk_size=chunk_size)
    z = latents(requires_grad=True)
    out = q(z)
    u = q.project_in(flat(z))
    per_sample, codebook = dense_lfq_entropies(u, 2.0)
    assert torch.allclose(out.stats["entropy_per_sample"], per_sample, atol=1e-5)
    assert torch.allclose(out.stats["entropy_codebook"], codebook, atol=1e-5)
    expected_loss = 0.1 * (per_sample - codebook) + 0.25 * F.mse_loss(u, torch.sign(u))
    assert torch.allclose(out.loss, expected_loss, atol=1e-5)
    grad, = torch.autograd.grad(out.loss, z)
    grad_ref, = torch.autograd.grad(expected_loss, z)
    assert torch.allclose(grad, grad_ref, atol=1e-5)


def test_lfq_factorized_entropy_is_upper_bound_of_exact():
    z = latents()
    exact = LFQuantizer(DIM, 32, temperature=2.0)
    factorized = LFQuantizer(DIM, 32, temperature=2.0, entropy_mode="factorized")
    factorized.load_state_dict(exact.state_dict())
    h_exact, h_fact = exact(z).stats["entropy_codebook"], factorized(z).stats["entropy_codebook"]
    u = exact.project_in(flat(z)).detach()
    assert torch.allclose(h_fact, binary_entropy(torch.sigmoid(4 * u / 2.0).mean(0)).sum(), atol=1e-6)
    assert h_fact >= h_exact - 1e-6 and h_fact <= 5 * math.log(2) + 1e-6


def test_lfq_option_errors():
    with pytest.raises(ValueError, match="power of two"):
        build_quantizer("lfq", dim=DIM, codebook_size=1000)
    with pytest.raises(ValueError, match="entropy_mode"):
        build_quantizer("lfq", dim=DIM, codebook_size=64, entropy_mode="approx")
    with pytest.raises(ValueError, match="temperature"):
        build_quantizer("lfq", dim=DIM, codebook_size=64, temperature=0.0)


# ----------------------------------------------------------------------------- IBQ
def dense_ibq_reference(x, codebook, beta=0.25, entropy_weight=0.05, temperature=0.01, gamma=1.0):
    """Plain autograd over full N x K tensors, written as the IBQ release writes it:

    z_q = (onehot + p - sg p) C,  z_hard = onehot C,
    L = mse(z_q, x) + mse(sg(z_hard), x) + beta mse(z_hard, sg(x)) + w_e (H_sample - gamma H_batch).
    """
    logits = x @ codebook.t()
    p = torch.softmax(logits, dim=1)
    indices = logits.argmax(1)
    one_hot = F.one_hot(indices, codebook.shape[0]).float()
    quantized = (one_hot + p - p.detach()) @ codebook
    hard = one_hot @ codebook
    p_e = torch.softmax(logits / temperature, dim=1)
    per_sample = -(p_e * p_e.clamp_min(1e-30).log()).sum(1).mean()
    mean_p = p_e.mean(0)
    codebook_entropy = -(mean_p * mean_p.clamp_min(1e-30).log()).sum()
    loss = (torch.mean((quantized - x) ** 2) + torch.mean((hard.detach() - x) ** 2)
            + beta * torch.mean((hard - x.detach()) ** 2) + entropy_weight * (per_sample - gamma * codebook_entropy))
    return quantized, indices, loss


@pytest.mark.parametrize("chunk_size", [4, None])
def test_ibq_matches_dense_reference_values_and_gradients(chunk_size):
    q = IBQuantizer(DIM, 16, chunk_size=chunk_size, entropy_temperature=0.5)
    z = latents(requires_grad=True)
    out = q(z)
    x = flat(z)
    ref_q, ref_idx, ref_loss = dense_ibq_reference(x, q.codebook, temperature=0.5)
    assert torch.equal(out.indices.reshape(-1), ref_idx)
    assert torch.allclose(flat(out.quantized), ref_q, atol=1e-6)
    assert torch.allclose(out.loss, ref_loss, atol=1e-5)
    weights = torch.randn_like(out.quantized)
    objective = (out.quantized * weights).sum() + out.loss
    ref_objective = (ref_q * flat(weights)).sum() + ref_loss
    grads = torch.autograd.grad(objective, (z, q.codebook))
    ref_grads = torch.autograd.grad(ref_objective, (z, q.codebook))
    for grad, ref in zip(grads, ref_grads):
        assert torch.allclose(grad, ref, atol=1e-5)


def test_ibq_loss_terms_route_gradients_like_the_release():
    """Without L_double and the entropy term: d/dx = 2 (x - c_i) / (N C) (L_commit, weight 1) and
    d/dC = beta * 2 (c_i - x) / (N C) summed on the chosen codes only (L_codebook); unchosen codes get none."""
    q = IBQuantizer(DIM, 16, double_weight=0.0, entropy_weight=0.0, beta=0.4)
    z = latents(requires_grad=True)
    out = q(z)
    x = flat(z)
    hard = q.codebook[out.indices.reshape(-1)]
    numel = x.numel()
    for name, expected in (("loss_double", F.mse_loss(flat(out.quantized), x)),
                           ("loss_commit", F.mse_loss(hard, x)), ("loss_codebook", F.mse_loss(hard, x))):
        assert torch.allclose(out.stats[name], expected, atol=1e-6), name
    assert torch.allclose(out.loss, out.stats["loss_commit"] + 0.4 * out.stats["loss_codebook"], atol=1e-6)
    grad_z, grad_c = torch.autograd.grad(out.loss, (z, q.codebook))
    assert torch.allclose(flat(grad_z), 2 * (x - hard).detach() / numel, atol=1e-6)
    expected_c = torch.zeros_like(q.codebook).index_add_(0, out.indices.reshape(-1), 0.4 * 2 * (hard - x).detach() / numel)
    assert torch.allclose(grad_c, expected_c, atol=1e-6)


def test_ibq_index_is_max_dot_product_and_option_errors():
    q = IBQuantizer(DIM, 16)
    z = latents()
    assert torch.equal(q(z).indices.reshape(-1), (flat(z) @ q.codebook.t()).argmax(1))
    with pytest.raises(ValueError, match="entropy_temperature"):
        build_quantizer("ibq", dim=DIM, codebook_size=16, entropy_temperature=-1.0)
