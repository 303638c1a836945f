"""The tiny VLM (model.py): causality, initial loss, overfitting one batch, KV-cached generation against
recomputation, seeded initialisation, and LoRA: the adapter starts as the identity and merges exactly.

Run: python -m pytest tests/test_model.py -q
"""
import math

import pytest
import torch
import torch.nn as nn

from model import VLM, LoRALinear, ModelConfig, add_lora

VOCAB = 50


def tiny(**kw):
    return ModelConfig(**{**dict(d_model=32, n_layer=2, n_head=2, vit_dim=32, vit_layers=1,
                                 vocab_size=VOCAB, max_text_len=16), **kw})


def inputs(seed, B=3, T=10):
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand(B, 3, 48, 48, generator=gen) * 2 - 1
    ids = torch.randint(5, VOCAB, (B, T), generator=gen)
    return images, ids


# ----------------------------------------------------------------------------------------------
# causality

@pytest.mark.parametrize("attn", ["manual", "sdpa"])
def test_a_future_token_cannot_change_past_logits(attn):
    model = VLM(tiny(attn=attn), seed=0).eval()
    images, ids = inputs(1)
    P, t = model.cfg.n_patches, 6
    changed = ids.clone()
    changed[:, t] = (changed[:, t] + 1 - 5) % (VOCAB - 5) + 5  # another ordinary token
    with torch.no_grad():
        prefix = model.image_prefix(images)
        full = model.decode(torch.cat([prefix, model.tok_emb(ids)], 1))        # (B, P+T, V)
        other = model.decode(torch.cat([prefix, model.tok_emb(changed)], 1))
        logits, _ = model(images, ids)
    assert torch.equal(logits, full[:, P:])
    assert torch.allclose(full[:, :P + t], other[:, :P + t], atol=1e-6, rtol=0)  # the image and text before t
    assert (full[:, P + t:] - other[:, P + t:]).abs().amax(-1).min() > 1e-4  # every later position sees it


def test_every_text_position_sees_the_image():
    model = VLM(tiny(), seed=0).eval()
    images, ids = inputs(2)
    with torch.no_grad():
        a, _ = model(images, ids)
        b, _ = model(images.roll(1, 0), ids)  # the same text, each row with another row's image
    assert (a - b).abs().amax(-1).min() > 1e-4


# ----------------------------------------------------------------------------------------------
# loss and learning

def test_initial_loss_is_about_ln_vocab():
    model = VLM(tiny(), seed=0)
    images, ids = inputs(3, B=8, T=12)
    _, loss = model(images, ids[:, :-1], ids[:, 1:])
    assert abs(loss.item() - math.log(VOCAB)) < 0.3


def test_loss_ignores_masked_targets():
    model = VLM(tiny(), seed=0)
    images, ids = inputs(4)
    targets = ids.clone()
    targets[:, :5] = -100
    logits, loss = model(images, ids, targets)
    expected = torch.nn.functional.cross_entropy(logits[:, 5:].reshape(-1, VOCAB), ids[:, 5:].reshape(-1))
    assert torch.allclose(loss, expected)


def test_overfits_one_batch():
    model = VLM(tiny(), seed=0)
    images, ids = inputs(5, B=4, T=13)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(300):
        _, loss = model(images, ids[:, :-1], ids[:, 1:])
        if loss.item() < 0.05:
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    assert loss.item() < 0.05


# ----------------------------------------------------------------------------------------------
# generation

def recompute_greedy(model, images, ids, n):
    """Greedy decoding the slow, obvious way: a full forward pass for every new token."""
    out = ids
    for _ in range(n):
        logits, _ = model(images, out)
        out = torch.cat([out, logits[:, -1].argmax(-1, keepdim=True)], 1)
    return out[:, ids.size(1):]


@pytest.mark.parametrize("attn", ["manual", "sdpa"])
def test_generate_equals_decoding_by_recompute(attn):
    model = VLM(tiny(attn=attn), seed=0).double().eval()  # float64: no near-ties between the two paths
    with torch.no_grad():
        model.tok_emb.weight.mul_(40)  # sharper logits, so the argmax follows the context
    images, ids = inputs(7, B=4, T=5)
    images = images.double()
    n = model.cfg.max_text_len - ids.size(1)  # up to the last position the model can read
    with torch.no_grad():
        fast = model.generate(images, ids, n)
        slow = recompute_greedy(model, images, ids, n)
    assert fast.shape == (4, n)
    assert torch.equal(fast, slow)
    assert len(set(fast.flatten().tolist())) > 3  # not one token repeated: the test can see a cache bug


def test_generate_stops_when_every_row_has_ended():
    """Two rows that both emit the end marker, at different steps: decoding runs until the later one, and
    stops there, before max_new_tokens. A row that never emits it keeps the batch going to the end."""
    model, n = VLM(tiny(), seed=0).eval(), 8
    images, ids = inputs(8, B=8, T=5)
    with torch.no_grad():
        free = model.generate(images, ids, n)
    first = {}  # token -> {row: the step it first appears at}, for steps before the last
    for r, row in enumerate(free.tolist()):
        for step, token in enumerate(row[:n - 1]):
            first.setdefault(token, {}).setdefault(r, step)
    # the end marker: a token two rows emit first at different steps (the earliest such pair)
    eos, (early, late) = min((token, (a, b)) for token, rows in first.items()
                             for a in rows for b in rows if rows[a] < rows[b])
    ends = first[eos][early], first[eos][late]
    with torch.no_grad():
        stopped = model.generate(images[[early, late]], ids[[early, late]], n, eos_id=eos)
    assert stopped.shape == (2, ends[1] + 1) and ends[1] + 1 < n  # stopped at the later row's end
    assert torch.equal(stopped, free[[early, late], :ends[1] + 1])  # the early row went on (junk after it)
    never = next(r for r in range(len(free)) if eos not in free[r].tolist())
    with torch.no_grad():
        unfinished = model.generate(images[[early, never]], ids[[early, never]], n, eos_id=eos)
    assert torch.equal(unfinished, free[[early, never]])


# ----------------------------------------------------------------------------------------------
# initialisation

def test_same_seed_gives_identical_weights():
    a, b, c = (VLM(tiny(), seed=s).state_dict() for s in (0, 0, 1))
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    random_weights = [k for k in a if a[k].dim() >= 2]  # biases and LayerNorms are constants
    assert all(not torch.equal(a[k], c[k]) for k in random_weights)


def test_linear_layers_start_at_std_one_over_sqrt_fan_in():
    """What VLM.__init__'s comment promises: every Linear weight has std 1/√fan_in (residual
    projections a further 1/√(2·n_layer)), and the tied token embedding has std 0.02."""
    model = VLM(tiny(n_layer=2, vit_layers=2), seed=0)
    residual = {"attn.proj", "mlp.2"}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or module is model.lm_head:
            continue
        expected = module.in_features ** -0.5
        if any(name.endswith(r) for r in residual):
            expected /= math.sqrt(2 * 2)
        std = module.weight.std().item()
        assert abs(std / expected - 1) < 0.15, f"{name}: std {std:.4f}, expected {expected:.4f}"
    assert abs(model.tok_emb.weight.std().item() / 0.02 - 1) < 0.15


def test_initialisation_ignores_torch_global_generator():
    """VLM draws its weights from its own seeded generator, whatever state the global stream is in."""
    a = VLM(tiny(), seed=0).state_dict()
    with torch.random.fork_rng(devices=[]):  # the global state is restored on exit
        torch.rand(1000)  # move the global stream somewhere else
        b = VLM(tiny(), seed=0).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------------------------
# LoRA

def test_lora_starts_as_the_base_layer_and_merges_exactly():
    gen = torch.Generator().manual_seed(0)
    base = nn.Linear(12, 7)
    x = torch.randn(5, 12, generator=gen)
    want, weight = base(x).detach(), base.weight.detach().clone()
    lora = LoRALinear(base, rank=3, alpha=6.0, gen=gen)
    assert torch.equal(lora(x), want)  # B = 0: the adapter adds exactly nothing
    assert not lora.weight.requires_grad and lora.lora_A.requires_grad
    with torch.no_grad():
        lora.lora_B.copy_(torch.randn(7, 3, generator=gen))
    unmerged = lora(x).detach()
    assert not torch.allclose(unmerged, want)
    lora.merge()
    assert torch.allclose(lora(x), unmerged, atol=1e-5)
    lora.unmerge()
    assert torch.allclose(lora.weight, weight, atol=1e-6)
    assert torch.allclose(lora(x), unmerged, atol=1e-5)


def test_add_lora_keeps_state_dict_names_and_output():
    model = VLM(ModelConfig(vocab_size=20, vit_dim=32, d_model=32, n_head=2, vit_layers=1, n_layer=1))
    images, ids = torch.zeros(2, 3, 48, 48), torch.ones(2, 5, dtype=torch.long)
    before, names = model(images, ids)[0], set(model.state_dict())
    add_lora(model, ["attn.qkv", "attn.proj", "mlp.0", "mlp.2"], 4, 8.0, seed=0)
    assert names <= set(model.state_dict())  # the base weights keep their names
    assert torch.equal(model(images, ids)[0], before)
