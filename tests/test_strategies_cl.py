"""The continual-learning strategies: each one's invariant, on tiny seeded models, on the CPU.

    python -m pytest tests/test_strategies_cl.py -q

EWC/MAS importances against hand-computed values, LoRA's identity start and merge round trip,
expansion's frozen experts and routing, TIR's scaling and similarity, composition and checkpoints,
bad command lines, and a tiny end-to-end run of a few strategies.
"""
import io
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import data  # noqa: E402
import eval as metrics  # noqa: E402  (this project's eval.py)
import strategies  # noqa: E402
import train  # noqa: E402
from model import VLM, LoRALinear, ModelConfig, add_lora  # noqa: E402
from strategies import StrategyConfig, importance, task_similarity, tir_weights  # noqa: E402

SMALL = dict(vit_dim=32, d_model=32, n_head=2, vit_layers=1, n_layer=1)  # a VLM that steps in milliseconds


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors gain nothing from threads, and on a busy machine their spin-waits cost seconds."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok():
    return data.train_tokenizer(list(data.TASKS.values()) + [data.ALIGN], seed=0)


@pytest.fixture(scope="module")
def tasks(tok):
    """(train, test) Examples of two tasks that look and read differently: classify and read."""
    return [data.make_task(data.TASKS[n], 48, 16, 0, tok, 48, 40) for n in ("classify", "read")]


def tiny_vlm(tok):
    return VLM(ModelConfig(vocab_size=tok.get_vocab_size(), **SMALL), seed=0)


def train_a_little(model, strategy, rows, steps=3, seed=0):
    """The train.py loop in miniature: the strategy's batch and penalty hooks around SGD steps."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt, gen = torch.optim.SGD(params, lr=0.1), torch.Generator().manual_seed(seed)
    for _ in range(steps):
        batch_rows = strategy.batch(rows.subset(torch.randint(len(rows), (8,), generator=gen)), gen)
        batch = data.to_batch(batch_rows, range(len(batch_rows)), "cpu")
        logits, loss = model(*batch)
        extra = strategy.penalty(model, batch, logits)
        opt.zero_grad()
        (loss if extra is None else loss + extra).backward()
        opt.step()


def run_task(model, strategy, task_id, rows, steps=3):
    strategy.before_task(model, task_id, rows)
    train_a_little(model, strategy, rows, steps, seed=task_id)
    strategy.after_task(model, task_id, rows)


# ----------------------------------------------------------------------------------------------
# EWC and MAS: importances from per-sample gradients

class TwoParams(nn.Module):
    """logits = [0, 0, 0, 0, a·x, b·x] at every position, x the mean pixel: gradients by hand."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Parameter(torch.tensor(0.7)), nn.Parameter(torch.tensor(-0.4))

    def forward(self, images, ids, targets=None):
        x = images.mean((1, 2, 3))  # (B,)
        zero = torch.zeros_like(x)
        logits = torch.stack([zero, zero, zero, zero, self.a * x, self.b * x], -1)  # (B, 6)
        return logits[:, None].expand(-1, ids.size(1), -1), None


def eos_rows(pixel_values):
    """Rows '[BOS] [SEP] [EOS]' with 1x1 images: the one answer token is EOS (id 4, logit a·x)."""
    n = len(pixel_values)
    images = torch.tensor(pixel_values, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 1, 1).contiguous()
    tokens = torch.tensor([[data.BOS, data.SEP, data.EOS, data.PAD]] * n, dtype=torch.int16)
    return data.Examples("toy", images, tokens, torch.full((n,), 2, dtype=torch.int16), [""] * n)


def test_fisher_is_the_mean_of_squared_per_sample_gradients():
    model, rows = TwoParams(), eos_rows([0, 60, 200, 255])
    fisher = importance(model, rows, "ewc", len(rows), torch.Generator().manual_seed(0))
    a, b = model.a.item(), model.b.item()
    x = torch.tensor([0, 60, 200, 255]) / 127.5 - 1
    z = 4 + torch.exp(a * x) + torch.exp(b * x)
    grad_a, grad_b = -x * (1 - torch.exp(a * x) / z), x * torch.exp(b * x) / z  # of -log p(EOS) = -a·x + log z
    assert torch.allclose(fisher["a"], grad_a.pow(2).mean(), atol=1e-6)
    assert torch.allclose(fisher["b"], grad_b.pow(2).mean(), atol=1e-6)
    assert fisher["a"] >= 0 and fisher["b"] >= 0
    assert not torch.allclose(fisher["a"], grad_a.mean().pow(2), atol=1e-3)  # not the squared batch-mean gradient


def test_mas_importance_is_the_mean_absolute_gradient_of_the_squared_logit_norm():
    model, rows = TwoParams(), eos_rows([10, 128, 250])
    omega = importance(model, rows, "mas", len(rows), torch.Generator().manual_seed(0))
    x = torch.tensor([10, 128, 250]) / 127.5 - 1
    # ‖logits‖² = (a·x)² + (b·x)², so ∂/∂a = 2a·x² and ∂/∂b = 2b·x²
    assert torch.allclose(omega["a"], (2 * 0.7 * x ** 2).abs().mean(), atol=1e-6)
    assert torch.allclose(omega["b"], (2 * -0.4 * x ** 2).abs().mean(), atol=1e-6)


def test_vmapped_fisher_matches_a_loop_over_single_rows(tok, tasks):
    """The fast path (vmap, rows of unequal length in one chunk) against its slow twin."""
    model, rows = tiny_vlm(tok), tasks[1][0].subset(range(6))
    fisher = importance(model, rows, "ewc", len(rows), torch.Generator().manual_seed(0))
    loop = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for i in range(len(rows)):
        model.zero_grad()
        _, loss = model(*data.to_batch(rows, [i], "cpu"))  # one row: the mean NLL of its answer tokens
        loss.backward()
        for n, p in model.named_parameters():
            loop[n] += p.grad ** 2 / len(rows)
    for n in loop:
        assert torch.allclose(fisher[n], loop[n], rtol=1e-4, atol=1e-9), n


def test_ewc_penalty_is_zero_at_the_anchor_and_positive_after_a_step(tok, tasks):
    model = tiny_vlm(tok)
    ewc = strategies.build("ewc", StrategyConfig(importance_samples=16))
    run_task(model, ewc, 0, tasks[0][0])
    batch = data.to_batch(tasks[1][0], range(8), "cpu")
    assert ewc.penalty(model, batch, None).item() == 0.0
    assert all(bool((f >= 0).all()) for f in ewc.importance.values())
    train_a_little(model, ewc, tasks[1][0], steps=1)
    assert ewc.penalty(model, batch, None).item() > 0


@pytest.mark.parametrize("spec,option", [("ewc", "ewc_lambda"), ("mas", "mas_lambda"), ("tir", "tir_lambda")])
def test_regulariser_penalty_and_its_gradient_match_a_hand_computation(tok, tasks, spec, option):
    """penalty = λ·Σ w·(θ - θ*)² and its gradient 2λ·w·(θ - θ*), in float64 by hand, where w is the
    importance (EWC's Fisher, MAS's Ω) or, for TIR, the importance times 1 - similarity(new task, owner)."""
    lam = 3.0  # not any option's default, and not 1: a penalty that ignores λ cannot match
    model = tiny_vlm(tok)
    strategy = strategies.build(spec, StrategyConfig(importance_samples=16, **{option: lam}))
    run_task(model, strategy, 0, tasks[0][0])
    strategy.before_task(model, 1, tasks[1][0])  # TIR weighs the importances for task 1 here
    importance, anchor = strategy.importance, strategy.anchor
    weights = importance
    if spec == "tir":
        keep = 1 - task_similarity(strategy.prototypes, 0.5)[1].double()  # (tasks,): 1 - similarity to each task
        weights = {n: f.double() * keep[strategy.owner[n].long()] for n, f in importance.items()}
    every = torch.cat([f.flatten() for f in importance.values()])
    assert float(every.std()) > 0.1 * float(every.mean()) > 0  # uneven: dropping w changes the gradient
    gen = torch.Generator().manual_seed(0)
    params = dict(model.named_parameters())
    with torch.no_grad():  # move every protected parameter off its anchor
        for n in importance:
            params[n].add_(0.01 * torch.randn(params[n].shape, generator=gen))
    value = strategy.penalty(model, None, None)
    assert value.requires_grad, "the penalty has no gradient: it cannot pull the parameters back"
    grads = dict(zip(importance, torch.autograd.grad(value, [params[n] for n in importance])))
    delta = {n: params[n].detach().double() - anchor[n].double() for n in importance}
    hand = lam * sum(float((weights[n].double() * delta[n] ** 2).sum()) for n in importance)
    assert value.item() == pytest.approx(hand, rel=1e-5)
    for n in importance:
        want = 2 * lam * weights[n].double() * delta[n]
        assert torch.allclose(grads[n].double(), want, rtol=1e-4, atol=1e-6 * float(want.abs().max())), n


def test_ewc_covers_only_trainable_parameters_and_decays_online(tok, tasks):
    model = tiny_vlm(tok)
    for p in model.vision.parameters():
        p.requires_grad_(False)
    ewc = strategies.build("ewc", StrategyConfig(importance_samples=8, importance_decay=0.5))
    run_task(model, ewc, 0, tasks[0][0])
    assert ewc.importance and not any(n.startswith("vision.") for n in ewc.importance)
    first = {n: f.clone() for n, f in ewc.importance.items()}
    new = importance(model, tasks[1][0], "ewc", 8, torch.Generator().manual_seed(1))
    ewc.after_task(model, 1, tasks[1][0])
    for n in first:  # F ← γF + F_new, with the same rows the strategy draws for task 1
        assert torch.allclose(ewc.importance[n], 0.5 * first[n] + new[n], atol=1e-9)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert ewc.extra_bytes() == 2 * trainable * 4  # importances and anchors: two float32 per parameter


def test_lwf_penalty_is_zero_against_its_own_copy_and_positive_after_a_step(tok, tasks):
    model, lwf = tiny_vlm(tok), strategies.build("lwf", StrategyConfig())
    run_task(model, lwf, 0, tasks[0][0])
    lwf.before_task(model, 1, tasks[1][0])
    batch = data.to_batch(tasks[1][0], range(8), "cpu")
    assert abs(lwf.penalty(model, batch, model(*batch)[0]).item()) < 1e-6
    train_a_little(model, lwf, tasks[1][0], steps=2)
    assert lwf.penalty(model, batch, model(*batch)[0]).item() > 1e-6


def test_lwf_penalty_and_its_gradient_match_a_hand_computation(tok, tasks):
    """penalty = α·T²·KL(softmax(teacher/T) ‖ softmax(model/T)), averaged over the answer positions, and
    its gradient α·T·(softmax(model/T) - softmax(teacher/T)) / n_answers on the logits, zero elsewhere."""
    alpha, T = 0.7, 2.0  # neither 1: a penalty without α or T² cannot match
    model, lwf = tiny_vlm(tok), strategies.build("lwf", StrategyConfig(lwf_alpha=alpha, lwf_temperature=T))
    run_task(model, lwf, 0, tasks[0][0])
    lwf.before_task(model, 1, tasks[1][0])
    train_a_little(model, lwf, tasks[1][0], steps=2)  # the model moves away from its teacher
    batch = data.to_batch(tasks[1][0], range(8), "cpu")
    logits = model(*batch)[0].detach().requires_grad_(True)
    value = lwf.penalty(model, batch, logits)
    assert value.requires_grad, "the penalty has no gradient: it cannot pull the model towards its teacher"
    (grad,) = torch.autograd.grad(value, logits)
    with torch.no_grad():
        teacher = torch.func.functional_call(model, lwf.teacher, batch[:2])[0]
    answer = batch[2] != -100
    p = torch.softmax(teacher[answer].double() / T, -1)  # the teacher's distribution: KL's first argument
    q = torch.softmax(logits.detach()[answer].double() / T, -1)
    n = int(answer.sum())
    hand = alpha * T * T * float((p * (p.log() - q.log())).sum()) / n
    assert value.item() == pytest.approx(hand, rel=1e-4) and hand > 1e-4
    want = torch.zeros_like(grad, dtype=torch.float64)
    want[answer] = alpha * T * (q - p) / n
    assert torch.allclose(grad.double(), want, rtol=1e-3, atol=1e-4 * float(want.abs().max()))


def test_joint_trains_on_the_union_of_the_tasks_so_far(tok, tasks):
    joint = strategies.build("joint", StrategyConfig(), seed=0)
    for t in (0, 1):
        joint.before_task(None, t, tasks[t][0])
    names = set(joint.batch(tasks[1][0].subset(range(40)), torch.Generator().manual_seed(0)).answers)
    assert names & set(tasks[0][0].answers) and names & set(tasks[1][0].answers)


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


def test_lora_strategy_trains_only_the_adapters(tok, tasks):
    model = tiny_vlm(tok)
    for p in model.vision.parameters():
        p.requires_grad_(True)  # as train.py leaves them with --no-freeze-vision: LoRA must still win
    lora = strategies.build("lora", StrategyConfig(lora_targets="attn.qkv,mlp.2,projector"))
    lora.before_task(model, 0, tasks[0][0])
    _, loss = model(*data.to_batch(tasks[0][0], range(4), "cpu"))
    loss.backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == (".lora_" in n), n
    assert sum(".lora_" in n for n, _ in model.named_parameters()) == 2 * (2 * SMALL["n_layer"] + 2)
    assert lora.extra_bytes() == 4 * sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)


def test_add_lora_keeps_state_dict_names_and_output():
    model = VLM(ModelConfig(vocab_size=20, **SMALL))
    images, ids = torch.zeros(2, 3, 48, 48), torch.ones(2, 5, dtype=torch.long)
    before, names = model(images, ids)[0], set(model.state_dict())
    add_lora(model, ["attn.qkv", "attn.proj", "mlp.0", "mlp.2"], 4, 8.0, seed=0)
    assert names <= set(model.state_dict())  # the base weights keep their names
    assert torch.equal(model(images, ids)[0], before)


# ----------------------------------------------------------------------------------------------
# expansion

def test_old_experts_are_bit_identical_after_a_new_task(tok, tasks):
    model, expansion = tiny_vlm(tok), strategies.build("expansion", StrategyConfig(lora_rank=2))
    batch = data.to_batch(tasks[0][1], range(6), "cpu")
    run_task(model, expansion, 0, tasks[0][0])
    after_first = model(*batch)[0]
    run_task(model, expansion, 1, tasks[1][0])
    assert not torch.equal(model(*batch)[0], after_first)  # expert 1 in place: it did train
    expansion.load(model, expansion.experts[0])
    assert torch.equal(model(*batch)[0], after_first)  # expert 0 and the frozen base: untouched


def test_expansion_routes_each_row_to_its_own_task(tok, tasks):
    model, expansion = tiny_vlm(tok), strategies.build("expansion", StrategyConfig(lora_rank=2))
    for t in (0, 1):
        run_task(model, expansion, t, tasks[t][0], steps=1)
    result = expansion.extra_results(model, [test for _, test in tasks])
    assert result["task_id_accuracy_per_task"] == [100.0, 100.0]
    swapped = expansion.extra_results(model, [tasks[1][1], tasks[0][1]])  # wrong labels must score 0
    assert swapped["task_id_accuracy"] == 0.0
    test = tasks[1][1]  # generate routes too: read prompts must be answered by expert 1
    p = int(test.prompt_len[0])
    rows = [i for i in range(len(test)) if test.prompt_len[i] == p]
    images, ids = data.pixels(test.images[rows]), test.tokens[rows, :p].long()
    routed = expansion.generate(model, images, ids, 6, data.EOS)
    expansion.load(model, expansion.experts[1])
    direct = model.generate(images, ids, 6, data.EOS)
    assert torch.equal(routed[:, :direct.size(1)], direct)


def test_a_batch_routed_to_several_experts_is_answered_row_by_row_by_each_rows_expert(tok, tasks):
    """One batch of classify and read questions, interleaved: the router splits it, each expert answers its
    rows, and the answers are scattered back to the right rows. A group that ends early is EOS-padded."""
    model, expansion = tiny_vlm(tok), strategies.build("expansion", StrategyConfig(lora_rank=2))
    for t in (0, 1):
        run_task(model, expansion, t, tasks[t][0], steps=3)
    p = 7  # a prompt length both tasks' test rows have: generate takes prompts of one length
    by_task = [[i for i in range(len(tasks[t][1])) if tasks[t][1].prompt_len[i] == p] for t in (0, 1)]
    order = sorted([(k, t, i) for t in (0, 1) for k, i in enumerate(by_task[t])])  # classify, read, ...
    images = torch.cat([data.pixels(tasks[t][1].images[[i]]) for _, t, i in order])
    ids = torch.cat([tasks[t][1].tokens[[i], :p].long() for _, t, i in order])
    label = [t for _, t, _ in order]
    assert 0 < sum(label) < len(label) and label[:4] == [0, 1, 0, 1]
    features = strategies.row_features(model, dict(model.named_parameters()), images, ids,
                                       torch.full((len(ids),), p))[:2]
    assert expansion.route(features).tolist() == label  # the router splits the batch by task
    n, in_place = 6, strategies.copy_params(expansion.live(model).items())

    def alone(i, eos):  # row i answered on its own by its own expert: the slow, obvious twin
        expansion.load(model, expansion.experts[label[i]])
        return model.generate(images[[i]], ids[[i]], n, eos)[0]
    eos = int(alone(label.index(1), None)[0])  # the read expert's first token ends its rows at once
    answers = [alone(i, eos).tolist() for i in range(len(label))]
    expansion.load(model, in_place)
    routed = expansion.generate(model, images, ids, n, eos)
    assert torch.equal(strategies.copy_params(expansion.live(model).items())["projector.0.weight"],
                       in_place["projector.0.weight"])  # the expert in place is put back
    assert routed.shape == (len(label), n)
    for i, answer in enumerate(answers):  # each row's answer, up to its end marker, is its own expert's
        assert routed[i, :len(answer)].tolist() == answer, i
    read = [i for i, t in enumerate(label) if t == 1]
    ends = max(len(answers[i]) for i in read)
    assert ends < n and (routed[read, ends:] == eos).all()  # read's group stopped early: EOS-padded


# ----------------------------------------------------------------------------------------------
# TIR

def test_tir_weights_scale_each_entry_by_one_minus_its_owners_similarity():
    similarity = torch.tensor([[1.0, 0.2, 0.9], [0.2, 1.0, 0.5], [0.9, 0.5, 1.0]])
    importance_ = {"w": torch.tensor([1.0, 2.0, 3.0])}
    owner = {"w": torch.tensor([0, 1, 0], dtype=torch.int16)}
    scaled = tir_weights(importance_, owner, similarity, task_id=2)
    assert torch.allclose(scaled["w"], torch.tensor([1.0 * 0.1, 2.0 * 0.5, 3.0 * 0.1]))


def test_tir_merges_normalised_importances_by_max_and_remembers_the_owner():
    tir = strategies.build("tir", StrategyConfig())
    tir.merge({"w": torch.tensor([1.0, 3.0])}, 0)  # mean 2 -> [0.5, 1.5]
    tir.merge({"w": torch.tensor([4.0, 0.0])}, 1)  # mean 2 -> [2.0, 0.0]
    assert torch.equal(tir.importance["w"], torch.tensor([2.0, 1.5]))
    assert tir.owner["w"].tolist() == [1, 0]


def test_identical_tasks_are_the_most_similar(tok, tasks):
    """Two halves of classify's rows (different scenes, the same kind of task) beside read and count: the
    halves are each other's nearest task by far, by more than twice any other pair."""
    model = tiny_vlm(tok)
    base = dict(model.named_parameters())
    classify = tasks[0][0]
    count = data.make_task(data.TASKS["count"], 48, 1, 0, tok, 48, 40)[0]
    rows = [classify.subset(range(24)), tasks[1][0], count, classify.subset(range(24, 48))]
    assert not torch.equal(rows[0].images, rows[3].images)  # other scenes: no cosine of 1 by construction
    prototypes = [[f.mean(0) for f in strategies.examples_features(model, base, r)] for r in rows]
    similarity = task_similarity(prototypes, 0.5)
    assert torch.allclose(similarity, similarity.T) and bool(((similarity > 0) & (similarity <= 1)).all())
    others = [float(similarity[i, j]) for i in range(4) for j in range(i + 1, 4) if (i, j) != (0, 3)]
    assert similarity[0, 3] > 2 * max(others), (similarity[0, 3], others)  # classify's halves: the closest


def test_tir_end_to_end_on_two_tasks(tok, tasks):
    model = tiny_vlm(tok)
    tir = strategies.build("tir", StrategyConfig(importance_samples=8))
    run_task(model, tir, 0, tasks[0][0])
    tir.before_task(model, 1, tasks[1][0])
    keep = 1 - task_similarity(tir.prototypes, 0.5)[1, 0]
    for n, f in tir.importance.items():  # every entry belongs to task 0 so far
        assert torch.allclose(tir.weights()[n], f * keep)
    total, count = sum(f.sum() for f in tir.importance.values()), sum(f.numel() for f in tir.importance.values())
    assert abs(total / count - 1) < 1e-5  # normalised to mean 1


# ----------------------------------------------------------------------------------------------
# composition, checkpoints, command line

@pytest.mark.parametrize("spec", ["replay+ewc", "replay+expansion", "joint+lwf", "tir", "mas"])
def test_state_round_trips_through_a_weights_only_checkpoint(tok, tasks, spec):
    cfg = StrategyConfig(importance_samples=8, buffer_size=16, lora_rank=2)
    model, strategy = tiny_vlm(tok), strategies.build(spec, cfg, seed=3)
    for t in (0, 1):
        run_task(model, strategy, t, tasks[t][0], steps=2)
    buf = io.BytesIO()
    torch.save(strategy.state_dict(), buf)
    buf.seek(0)
    restored = strategies.build(spec, cfg, seed=3)
    restored.load_state_dict(torch.load(buf, weights_only=True))

    def flat(x):  # every tensor, number and string in the state, in order
        if not isinstance(x, (dict, list, tuple)):
            return [x]
        return [leaf for item in (x.values() if isinstance(x, dict) else x) for leaf in flat(item)]
    a, b = flat(strategy.state_dict()), flat(restored.state_dict())
    assert len(a) == len(b) and len(a) > 0
    assert all(torch.equal(x, y) if torch.is_tensor(x) else x == y for x, y in zip(a, b))
    assert restored.extra_bytes() == strategy.extra_bytes() > 0


def test_composition_runs_every_parts_hooks(tok, tasks):
    model = tiny_vlm(tok)
    both = strategies.build("replay+ewc", StrategyConfig(importance_samples=8, buffer_size=16))
    replay, ewc = both.parts
    run_task(model, both, 0, tasks[0][0])
    assert len(replay.buffer) == 16 and ewc.importance  # both after_task hooks ran
    mixed = both.batch(tasks[1][0].subset(range(8)), torch.Generator().manual_seed(0))
    assert set(mixed.answers) & set(tasks[0][0].answers)  # replay's batch hook ran
    train_a_little(model, both, tasks[1][0], steps=1)
    batch = data.to_batch(tasks[1][0], range(4), "cpu")
    assert both.penalty(model, batch, None).item() > 0  # ewc's penalty hook ran
    assert set(both.state_dict()) == {"replay", "ewc"}


@pytest.mark.parametrize("argv, says", [
    (["--strategy", "replay+"], "malformed"),
    (["--strategy", "replay+ewk"], "unknown strategy 'ewk'"),
    (["--strategy", "lwf", "--ewc-lambda", "5"], "--ewc-lambda is not an option of strategy 'lwf'"),
    (["--strategy", "lora", "--lora-targets", "attn.qkv,wte"], "--lora-targets"),
])
def test_bad_command_lines_exit_2_with_one_line(argv, says, tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "train.py"), *argv, "--run-dir", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.startswith("error: ") and says in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr


@pytest.mark.parametrize("spec", ["ewc", "lora", "expansion", "tir"])
def test_tiny_end_to_end_run(spec, tmp_path_factory):
    """train.py with each strategy: what the strategy did shows in the checkpoints it leaves."""
    cache, run = tmp_path_factory.getbasetemp() / "cache", tmp_path_factory.mktemp(spec.replace("+", "_"))
    argv = ["--strategy", spec, "--tasks", "classify,read", "--steps", "3", "--base-steps", "30", "--n-train", "32",
            "--n-test", "8", "--n-base", "32", "--batch-size", "8", "--run-dir", str(run), "--cache-dir", str(cache),
            "--vit-dim", "32", "--d-model", "32", "--n-head", "2", "--n-layer", "1", "--vit-layers", "1"]
    if spec in ("ewc", "tir"):
        argv += ["--importance-samples", "8"]
    assert train.main(argv) == 0
    results = json.loads((run / "results.json").read_text())
    assert len(results["matrix"]) == 2 and math.isfinite(results["metrics"]["AA"])
    assert all(0 <= a <= 100 for row in results["matrix"] for a in row)
    base, first, last = (torch.load(run / f, weights_only=True)
                         for f in ("base.pt", "task1-classify.pt", "task2-read.pt"))
    state = last["strategy"]
    trained = [n for n in base["model"] if not torch.equal(base["model"][n], last["model"][n])]
    adapters = [v for k, v in last["model"].items() if ".lora_" in k]
    assert results["extra_bytes"] == strategies.nbytes(adapters if spec == "lora" else state) > 0
    if spec in ("ewc", "tir"):  # importances of the trainable parameters; anchored where each task ended
        assert set(state["importance"]) == set(last["trainable"]) == set(state["anchor"])
        for ckpt in (first, last):
            assert all(torch.equal(a, ckpt["model"][n]) for n, a in ckpt["strategy"]["anchor"].items())
        assert not any(n.startswith("vision.") for n in state["importance"])  # --freeze-vision
    if spec == "tir":
        assert len(state["prototypes"]) == 2 and set(state["owner"]) == set(state["importance"])
        assert {int(v) for o in state["owner"].values() for v in o.unique()} == {0, 1}  # both own entries
        assert len(results["task_similarity"]) == 2
    if spec in ("lora", "expansion"):  # the base stays frozen: only adapters (and expansion's projector) move
        if spec == "lora":
            assert trained == []
        else:
            assert trained and all(n.startswith("projector.") for n in trained), trained
        assert all(".lora_" in n or n.startswith("projector.") for n in last["trainable"])
        assert any(v.abs().sum() > 0 for k, v in last["model"].items() if ".lora_B" in k)  # adapters learnt
    if spec == "expansion":
        assert results["task_id_accuracy"] == 100.0 and len(state["experts"]) == 2
        for k, ckpt in enumerate((first, last)):  # expert k is what task k's checkpoint held in place
            assert all(torch.equal(v, ckpt["model"][n]) for n, v in state["experts"][k].items())
        assert not all(torch.equal(state["experts"][0][n], v) for n, v in state["experts"][1].items())
    # train.py --evaluate: adapters and experts load back, and the last row comes out again
    assert train.reevaluate(run / "task2-read.pt") == results["matrix"][1]


def test_compare_puts_runs_side_by_side(tmp_path):
    def fake_run(strategy, aa, **extra):
        results = dict(config={"train": {"strategy": strategy}}, tasks=["a", "b"], wall_seconds=12.3,
                       metrics=dict(AA=aa, BWT=-4.0, forgetting=4.0, FWT=1.5), extra_bytes=3 * 1024 ** 2,
                       timings=[{"trainable": 10}, {"trainable": 1234}], **extra)
        folder = tmp_path / strategy
        folder.mkdir()
        (folder / "results.json").write_text(json.dumps(results))
        return folder
    runs = [fake_run("naive", 20.0), fake_run("expansion", 55.5, task_id_accuracy=97.25)]
    assert metrics.main(["--compare", *map(str, runs), str(tmp_path / "empty"), "--out", str(tmp_path / "out")]) == 0
    table = (tmp_path / "out" / "table.md").read_text().splitlines()
    assert table[0].startswith("| strategy | AA | BWT |") and table[0].endswith("task ID |")
    assert table[2] == "| expansion | 55.5 | -4.0 | 4.0 | +1.5 | 1,234 | 3.0 MB | 12 s | 97.2 |"  # best AA first
    assert table[3].startswith("| naive | 20.0 |") and table[3].endswith("| - |")
    assert (tmp_path / "out" / "table.png").stat().st_size > 0
