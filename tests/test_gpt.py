"""GPT prior: next-token loss, causality, KV cache == no cache, CFG, sampling filters, save/load, validation."""
import inspect
import math

import pytest
import torch
import torch.nn.functional as F

from prior.gpt import GPTPrior, filter_logits
from prior.maskgit import MaskGITPrior

K, C, GRID = 16, 4, 4


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny(**overrides):
    torch.manual_seed(0)
    kwargs = dict(codebook_size=K, num_classes=C, grid_size=GRID, hidden_size=32, num_layers=2, num_heads=4,
                  label_dropout=0.0)
    kwargs.update(overrides)
    return GPTPrior(**kwargs)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def test_logits_are_causal_and_loss_is_next_token_cross_entropy():
    model = tiny().eval()
    tokens = torch.randint(0, K, (2, GRID, GRID), generator=gen(0))
    labels = torch.tensor([1, 3])
    with torch.no_grad():
        logits = model(tokens, labels)
        assert logits.shape == (2, GRID * GRID, K)
        changed = tokens.clone().view(2, -1)
        changed[:, 9] = (changed[:, 9] + 1) % K
        logits2 = model(changed, labels)
        # logits[:, i] predicts t_i from (class, t_<i): changing t_9 leaves positions 0..9 unchanged
        assert torch.allclose(logits[:, :10], logits2[:, :10], atol=1e-5)
        assert not torch.allclose(logits[:, 10:], logits2[:, 10:], atol=1e-5)
        # the class token conditions position 0
        assert not torch.allclose(model(tokens, torch.tensor([0, 0]))[:, 0], logits[:, 0])
        loss, logs = model.loss(tokens, labels)
    expected = F.cross_entropy(logits.transpose(1, 2), tokens.view(2, -1))
    assert torch.allclose(loss, expected, atol=1e-6)
    assert set(logs) >= {"loss", "accuracy"}


def test_label_dropout_only_in_training_mode():
    model = tiny(label_dropout=0.5)
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(args[1].clone()))
    tokens = torch.randint(0, K, (400, GRID, GRID), generator=gen(1))
    labels = torch.randint(0, C, (400,), generator=gen(2))
    model.train()
    model.loss(tokens, labels, generator=gen(3))
    assert 0.4 < (seen[-1] == C).float().mean().item() < 0.6
    model.eval()
    model.loss(tokens, labels, generator=gen(3))
    assert torch.equal(seen[-1], labels)


def test_tiny_gpt_overfits_a_few_grids_and_regenerates_them():
    model = tiny(hidden_size=64)
    data = torch.randint(0, K, (4, GRID, GRID), generator=gen(4))
    labels = torch.arange(4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        loss, _ = model.loss(data, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        assert model.loss(data, labels)[0].item() < 0.05 * math.log(K)
    samples = model.generate(labels, top_k=1, generator=gen(5))
    assert torch.equal(samples, data)


@pytest.mark.parametrize("settings", [
    dict(),
    dict(guidance_scale=2.0),
    dict(guidance_scale=3.0, guidance_schedule="linear", temperature=1.5),
    dict(top_k=5, temperature=2.0),
    dict(top_p=0.8, guidance_scale=0.5),
])
def test_kv_cache_and_no_cache_sample_identical_tokens(settings):
    """The preallocated StaticCache (default), the growing DynamicCache and no cache give the same tokens."""
    model = tiny(grid_size=(3, 5)).eval()
    labels = [0, 2, 3]
    cached = model.generate(labels, generator=gen(6), use_cache=True, **settings)
    dynamic = model.generate(labels, generator=gen(6), use_cache="dynamic", **settings)
    uncached = model.generate(labels, generator=gen(6), use_cache=False, **settings)
    assert cached.shape == (3, 3, 5) and cached.dtype == torch.long
    assert torch.equal(cached, uncached) and torch.equal(dynamic, uncached)


def test_cache_choices_build_their_cache_and_a_bad_choice_is_named():
    from transformers import DynamicCache, StaticCache

    model = tiny(grid_size=(3, 5)).eval()
    labels = torch.tensor([0, 1])
    for choice in (True, "static"):
        assert isinstance(model.start_sampling(labels, use_cache=choice)["cache"], StaticCache)
    state = model.start_sampling(labels, use_cache="dynamic")
    assert state["cache"] is None
    model.sampling_logits(torch.zeros(2, 15, dtype=torch.long), 0, 1.0, state)
    assert isinstance(state["cache"], DynamicCache)
    with pytest.raises(ValueError, match="use_cache must be True, False, 'static' or 'dynamic', got 'paged'"):
        model.generate([0], generator=gen(1), use_cache="paged")


def test_sampling_is_seeded_and_in_range():
    model = tiny().eval()
    a = model.generate([1, 2, 3], guidance_scale=2.0, generator=gen(7))
    b = model.generate([1, 2, 3], guidance_scale=2.0, generator=gen(7))
    c = model.generate([1, 2, 3], guidance_scale=2.0, generator=gen(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert ((a >= 0) & (a < K)).all()


def test_classifier_free_guidance_convention():
    """l = l_u + s (l_c - l_u): with s = 0 the class is ignored, with s = 1 only the conditional pass runs."""
    model = tiny().eval()
    a = model.generate([0, 1], guidance_scale=0.0, generator=gen(9))
    b = model.generate([3, 3], guidance_scale=0.0, generator=gen(9))
    assert torch.equal(a, b)
    # s = 1 equals sampling from the conditional logits: greedy decoding with top_k=1 follows argmax l_c
    greedy = model.generate([2], guidance_scale=1.0, top_k=1, generator=gen(0))
    with torch.no_grad():
        logits = model(greedy, torch.tensor([2]))
    assert torch.equal(logits.argmax(-1), greedy.view(1, -1))
    # the guidance is applied to the head's input; the logits are those of l_u + s (l_c - l_u), cached or not
    tokens = torch.randint(0, K, (2, model.seq_len), generator=gen(3))
    labels = torch.tensor([1, 2])
    with torch.no_grad():
        cond = model(tokens, labels)
        uncond = model(tokens, torch.full_like(labels, C))
        for use_cache in (False, True):
            state = model.start_sampling(labels, guided=True, use_cache=use_cache)
            for t in range(4):
                guided = model.sampling_logits(tokens, t, 2.5, state)
                reference = uncond[:, t] + 2.5 * (cond[:, t] - uncond[:, t])
                assert torch.allclose(guided, reference, atol=1e-4), (use_cache, t)


def test_filter_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    kept = torch.isfinite(filter_logits(logits, top_k=2))
    assert kept.tolist() == [[True, True, False, False, False]]
    kept = torch.isfinite(filter_logits(logits, top_p=0.6))  # 0.5 < 0.6 -> also keep 0.2
    assert kept.tolist() == [[True, True, False, False, False]]
    kept = torch.isfinite(filter_logits(logits, top_p=0.3))  # the top entry always stays
    assert kept.tolist() == [[True, False, False, False, False]]
    shuffled = logits[:, [3, 0, 4, 1, 2]]
    assert torch.isfinite(filter_logits(shuffled, top_p=0.8)).tolist() == [[False, True, False, True, True]]
    assert torch.equal(filter_logits(logits), logits)


def test_save_load_round_trip(tmp_path):
    model = tiny(grid_size=(2, 3)).eval()
    model.save_pretrained(tmp_path)
    loaded = GPTPrior.from_pretrained(tmp_path).eval()
    assert loaded.grid_size == (2, 3) and loaded.codebook_size == K and loaded.num_classes == C
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    assert torch.equal(model.generate([0, 1], guidance_scale=2.0, generator=gen(1)),
                       loaded.generate([0, 1], guidance_scale=2.0, generator=gen(1)))


def test_input_validation():
    model = tiny()
    tokens = torch.randint(0, K, (2, GRID, GRID))
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        model.generate([4])
    with pytest.raises(ValueError, match="integers"):
        model.generate([0.0, 1.0])
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        model.loss(tokens, [0, 7])
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        model.loss(tokens.clone().fill_(K), [0, 1])
    with pytest.raises(ValueError, match="shape"):
        model.loss(torch.zeros(2, 3, 3, dtype=torch.long), [0, 1])
    with pytest.raises(ValueError, match="temperature"):
        model.generate([0], temperature=0.0)


def test_both_prior_types_share_the_caller_interface():
    maskgit = MaskGITPrior(codebook_size=K, num_classes=C, grid_size=(2, 3), hidden_size=16, num_layers=1, num_heads=2)
    gpt = GPTPrior(codebook_size=K, num_classes=C, grid_size=(2, 3), hidden_size=16, num_layers=1, num_heads=2)
    common = ("class_labels", "guidance_scale", "temperature", "generator", "guidance_schedule")
    for prior in (maskgit.eval(), gpt.eval()):
        assert (prior.codebook_size, prior.num_classes, prior.grid_size) == (K, C, (2, 3))
        assert set(common) <= set(inspect.signature(prior.generate).parameters)
        out = prior.generate(class_labels=[0, 3], guidance_scale=1.5, temperature=1.0, generator=gen(0))
        assert out.shape == (2, 2, 3) and out.dtype == torch.long and (out < K).all()
        loss, logs = prior.loss(torch.randint(0, K, (2, 2, 3)), [0, 1], generator=gen(1))
        assert loss.ndim == 0 and torch.isfinite(loss) and "loss" in logs
