"""The continual-learning strategies (strategies.py): each one's invariant, on tiny seeded models, on the CPU.

Reservoir sampling is uniform and replay mixes only stored fresh rows; build() composes, or refuses, strategy
names, and Compose runs every part's hooks; EWC/MAS importances and the EWC, MAS, TIR and LwF penalties
against hand computations; expansion's frozen experts, routing and oracle; TIR's similarity; state through a
weights-only checkpoint. Then each strategy's effect on a seeded micro-benchmark trained through train.tune.

Run: python -m pytest tests/test_strategies.py -q   (about a minute)
"""
import io
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import eval as ev
import llava
import strategies
import train
from llava import Examples
from model import VLM, ModelConfig
from eval import importance, task_similarity
from llava import ReservoirBuffer
from strategies import Compose, Replay, Strategy, StrategyConfig, tir_weights

SMALL = dict(vit_dim=32, d_model=32, n_head=2, vit_layers=1, n_layer=1)  # a VLM that steps in milliseconds


def rows(first, n):
    """n rows whose first token is their id (first, first+1, ...): every row can be traced."""
    ids = torch.arange(first, first + n)
    return Examples("t", images=(ids % 256).to(torch.uint8).view(n, 1, 1, 1).expand(n, 3, 2, 2).clone(),
                    tokens=torch.stack([ids, ids % 7], 1).to(torch.int16),
                    prompt_len=(ids % 5).to(torch.int16), answers=[f"a{i}" for i in ids.tolist()])


def row_ids(ex):
    return ex.tokens[:, 0].tolist()


def consistent(ex):
    """Every field of every row still belongs to the same original row."""
    ids = ex.tokens[:, 0].long()
    return (torch.equal(ex.images[:, 0, 0, 0], (ids % 256).to(torch.uint8))
            and torch.equal(ex.tokens[:, 1].long(), ids % 7)
            and torch.equal(ex.prompt_len.long(), ids % 5) and ex.answers == [f"a{i}" for i in ids.tolist()])


def config(**kw):
    return SimpleNamespace(**{**dict(buffer_size=10, replay_ratio=0.25), **kw})


@pytest.fixture(scope="module")
def tok():
    return llava.train_tokenizer(list(data.TASKS.values()) + [data.ALIGN], seed=0)


@pytest.fixture(scope="module")
def tasks(tok):
    """(train, test) Examples of two tasks that look and read differently: classify and read."""
    return [llava.make_task(data.TASKS[n], 48, 16, 0, tok, 48, 40) for n in ("classify", "read")]


def tiny_vlm(tok):
    return VLM(ModelConfig(vocab_size=tok.get_vocab_size(), **SMALL), seed=0)


def train_a_little(model, strategy, rows, steps=3, seed=0):
    """The train.py loop in miniature: the strategy's batch and penalty hooks around SGD steps."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt, gen = torch.optim.SGD(params, lr=0.1), torch.Generator().manual_seed(seed)
    for _ in range(steps):
        batch_rows = strategy.batch(rows.subset(torch.randint(len(rows), (8,), generator=gen)), gen)
        batch = llava.to_batch(batch_rows, range(len(batch_rows)), "cpu")
        logits, loss = model(*batch)
        extra = strategy.penalty(model, batch, logits)
        opt.zero_grad()
        (loss if extra is None else loss + extra).backward()
        opt.step()


def run_task(model, strategy, task_id, rows, steps=3):
    strategy.before_task(model, task_id, rows)
    train_a_little(model, strategy, rows, steps, seed=task_id)
    strategy.after_task(model, task_id, rows)


def rows_of(tok, name, split="train", n=24):
    return llava.make_split(data.TASKS[name], split, n, 0, tok, 48, 40)[0]


# ----------------------------------------------------------------------------------------------
# reservoir sampling

def test_reservoir_keeps_each_row_with_probability_k_over_n():
    n, k, trials = 200, 20, 300
    chunks = [5, 30, 15, 150]  # several add() calls; the second fills the buffer part way (15 of its 30 rows)
    kept = torch.zeros(n)
    for seed in range(trials):
        buffer, first = ReservoirBuffer(k, seed), 0
        for size in chunks:
            buffer.add(rows(first, size))
            first += size
            assert len(buffer) == min(k, first) and buffer.seen == first
        ids = row_ids(buffer.rows)
        assert len(set(ids)) == k and consistent(buffer.rows)
        kept[ids] += 1
    freq, p = kept / trials, k / n
    std = math.sqrt(p * (1 - p) / trials)  # binomial std of one row's inclusion frequency
    assert (freq - p).abs().max() < 4.5 * std, (freq - p).abs().max()
    # early and late rows are equally likely: means over 50 rows each, the std of their difference is about
    # std * sqrt(2/50)
    early, late = freq[:50].mean(), freq[-50:].mean()
    assert abs(early - late) < 4 * std * math.sqrt(2 / 50), (early, late)
    # the rows sampled inside the call that filled the buffer (20..34) are kept k/n too, not more: a count
    # that left out that call's first 15 rows would keep each with probability about n/200 (~0.14)
    straddling = freq[20:35].mean()
    assert abs(straddling - p) < 4 * std / math.sqrt(15), straddling


def test_reservoir_exact_probabilities_on_a_small_case():
    """Capacity 1, three rows offered one by one: each ends up kept 1/3 of the time (k/(n+1) would give
    1/4)."""
    trials = 3000
    kept = torch.zeros(3)
    for seed in range(trials):
        buffer = ReservoirBuffer(1, seed)
        for i in range(3):
            buffer.add(rows(i, 1))
        kept[row_ids(buffer.rows)] += 1
    std = math.sqrt((1 / 3) * (2 / 3) / trials)
    assert ((kept / trials - 1 / 3).abs() < 4 * std).all(), kept / trials


def test_buffer_never_exceeds_capacity():
    buffer = ReservoirBuffer(5, seed=0)
    for first, size in [(0, 2), (2, 2), (4, 9), (13, 1), (14, 40)]:
        buffer.add(rows(first, size))
        assert len(buffer) == min(5, first + size) and buffer.rows.tokens.shape[0] == len(buffer)
        assert consistent(buffer.rows)


def test_buffer_state_dict_round_trips():
    buffer = ReservoirBuffer(8, seed=3)
    buffer.add(rows(0, 30))
    fresh = ReservoirBuffer(1, seed=99)
    fresh.load_state_dict(buffer.state_dict())
    assert (fresh.capacity, fresh.seen) == (buffer.capacity, buffer.seen)
    for name in ("images", "tokens", "prompt_len", "answers"):
        a, b = getattr(fresh.rows, name), getattr(buffer.rows, name)
        assert (torch.equal(a, b) if torch.is_tensor(a) else a == b), name
    assert torch.equal(fresh.gen.get_state(), buffer.gen.get_state())
    buffer.add(rows(30, 30))  # the same future: both replace the same slots
    fresh.add(rows(30, 30))
    assert row_ids(fresh.rows) == row_ids(buffer.rows)
    empty = ReservoirBuffer(4, seed=0)
    empty.load_state_dict(ReservoirBuffer(4, seed=1).state_dict())
    assert len(empty) == 0


# ----------------------------------------------------------------------------------------------
# replay and joint

def test_replay_mixes_buffer_rows_only_after_a_task():
    B = 16
    replay = Replay(config(buffer_size=10, replay_ratio=0.25))
    gen = torch.Generator().manual_seed(0)
    fresh = rows(1000, B)
    assert row_ids(replay.batch(fresh, gen)) == row_ids(fresh)  # nothing stored yet: all fresh
    task0 = rows(0, 50)
    replay.after_task(None, 0, task0)
    assert replay.buffer.seen == 50 and len(replay.buffer) == 10
    stored = set(row_ids(replay.buffer.rows))
    for _ in range(20):
        mixed = replay.batch(rows(1000, B), gen)
        ids = row_ids(mixed)
        n_old = round(0.25 * B)
        assert len(mixed) == B and consistent(mixed)
        assert sum(i >= 1000 for i in ids) == B - n_old
        assert set(i for i in ids if i < 1000) <= stored
        assert replay.buffer.seen == 50 and set(row_ids(replay.buffer.rows)) == stored  # batch() never adds
    replay.after_task(None, 1, rows(2000, 50))
    assert replay.buffer.seen == 100 and all(i < 1000 or i >= 2000 for i in row_ids(replay.buffer.rows))


@pytest.mark.parametrize("ratio,B", [(0.5, 10), (0.1, 7), (0.0, 8)])
def test_replay_ratio_sets_the_number_of_old_rows(ratio, B):
    replay = Replay(config(buffer_size=20, replay_ratio=ratio))
    replay.after_task(None, 0, rows(0, 30))
    mixed = replay.batch(rows(1000, B), torch.Generator().manual_seed(1))
    assert len(mixed) == B
    assert sum(i < 1000 for i in row_ids(mixed)) == round(ratio * B)


def test_replay_state_dict_round_trips():
    replay = Replay(config(buffer_size=6), seed=1)
    replay.after_task(None, 0, rows(0, 20))
    other = Replay(config(buffer_size=6), seed=5)
    other.load_state_dict(replay.state_dict())
    assert row_ids(other.buffer.rows) == row_ids(replay.buffer.rows)
    assert other.extra_bytes() == replay.extra_bytes() > 0


def test_joint_trains_on_the_union_of_the_tasks_so_far(tok, tasks):
    joint = strategies.build("joint", StrategyConfig(), seed=0)
    for t in (0, 1):
        joint.before_task(None, t, tasks[t][0])
    names = set(joint.batch(tasks[1][0].subset(range(40)), torch.Generator().manual_seed(0)).answers)
    assert names & set(tasks[0][0].answers) and names & set(tasks[1][0].answers)


# ----------------------------------------------------------------------------------------------
# build and compose

def test_build_single_and_composed():
    cfg = config()
    naive = strategies.build("naive", cfg)
    assert type(naive) is Strategy and naive.name == "naive"
    assert type(strategies.build("replay", cfg)) is Replay
    both = strategies.build("naive+replay", cfg)
    assert isinstance(both, Compose) and both.name == "naive+replay"
    assert [type(p) for p in both.parts] == [Strategy, Replay] and both.options == Replay.options


@pytest.mark.parametrize("spec,message", [
    ("agem", r"unknown strategy 'agem'; choose from naive, replay, joint"),
    ("replay+foo", r"unknown strategy 'foo'"),
    ("replay+", r"empty part"),
    ("+replay", r"empty part"),
    ("", r"empty part"),
    ("replay+replay", r"names a part twice"),
])
def test_build_rejects_bad_names(spec, message):
    with pytest.raises(ValueError, match=message):
        strategies.build(spec, config())


class Recorder(Strategy):
    """Logs every hook call into cfg.log; penalty returns its weight; batch appends a tagged row."""
    weight = 1.0

    def before_task(self, model, task_id, train):
        self.cfg.log.append((self.name, "before", task_id))

    def batch(self, fresh, gen):
        self.cfg.log.append((self.name, "batch", len(fresh)))
        return Examples.concat([fresh, rows(self.tag, 1)])

    def penalty(self, model, batch, logits):
        self.cfg.log.append((self.name, "penalty"))
        return torch.tensor(self.weight)

    def after_task(self, model, task_id, train):
        self.cfg.log.append((self.name, "after", task_id))

    def extra_bytes(self):
        return self.tag

    def state_dict(self):
        return {"tag": self.tag}

    def load_state_dict(self, state):
        self.cfg.log.append((self.name, "load", state["tag"]))


class First(Recorder):
    name, tag, weight = "first", 100, 1.5


class Second(Recorder):
    name, tag, weight = "second", 200, 2.0


class Router(Strategy):
    name = "router"

    def generate(self, model, images, ids, max_new_tokens, eos_id):
        return "routed"


class OtherRouter(Router):
    name = "other-router"


@pytest.fixture
def registry(monkeypatch):
    for cls in (First, Second, Router, OtherRouter):
        monkeypatch.setitem(strategies.STRATEGIES, cls.name, cls)


def test_compose_runs_every_part_in_order(registry):
    cfg = config(log=[])
    both = strategies.build("first+second", cfg)
    both.before_task(None, 0, None)
    out = both.batch(rows(0, 3), None)
    assert row_ids(out) == [0, 1, 2, 100, 200]  # second saw first's output
    assert float(both.penalty(None, None, None)) == 3.5
    both.after_task(None, 0, None)
    assert both.extra_bytes() == 300
    state = both.state_dict()
    assert state == {"first": {"tag": 100}, "second": {"tag": 200}}
    both.load_state_dict(state)
    assert cfg.log == [("first", "before", 0), ("second", "before", 0), ("first", "batch", 3),
                       ("second", "batch", 4), ("first", "penalty"), ("second", "penalty"),
                       ("first", "after", 0), ("second", "after", 0),
                       ("first", "load", 100), ("second", "load", 200)]


def test_compose_routes_through_its_one_router(registry):
    assert strategies.build("first+router", config(log=[])).generate(None, None, None, 1, 0) == "routed"
    with pytest.raises(ValueError, match="only one part may route"):
        strategies.build("router+other-router", config())


def test_compose_penalty_is_none_when_no_part_has_one():
    assert strategies.build("naive+replay", config()).penalty(None, None, None) is None


def test_compose_passes_a_new_hook_to_every_part_in_order(monkeypatch):
    """A hook that Strategy gains (A-GEM's after-backward one, say) reaches each part of a composition, in
    order, with no edit of Compose; a name that is no hook is still an AttributeError."""
    monkeypatch.setattr(Strategy, "after_backward", lambda self, model: None, raising=False)
    calls = []

    class Part(Strategy):
        def after_backward(self, model):
            calls.append((self.name, model))
    first, second = Part(None), Part(None)
    first.name, second.name = "first", "second"
    both = Compose([first, second])
    both.after_backward("the model")
    assert calls == [("first", "the model"), ("second", "the model")]
    with pytest.raises(AttributeError):
        both.no_such_hook


def test_composition_runs_every_parts_hooks(tok, tasks):
    model = tiny_vlm(tok)
    both = strategies.build("replay+ewc", StrategyConfig(importance_samples=8, buffer_size=16))
    replay, ewc = both.parts
    run_task(model, both, 0, tasks[0][0])
    assert len(replay.buffer) == 16 and ewc.importance  # both after_task hooks ran
    mixed = both.batch(tasks[1][0].subset(range(8)), torch.Generator().manual_seed(0))
    assert set(mixed.answers) & set(tasks[0][0].answers)  # replay's batch hook ran
    train_a_little(model, both, tasks[1][0], steps=1)
    batch = llava.to_batch(tasks[1][0], range(4), "cpu")
    assert both.penalty(model, batch, None).item() > 0  # ewc's penalty hook ran
    assert set(both.state_dict()) == {"replay", "ewc"}


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


# ----------------------------------------------------------------------------------------------
# EWC and MAS: importances from per-sample gradients, and the penalties

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
    tokens = torch.tensor([[llava.BOS, llava.SEP, llava.EOS, llava.PAD]] * n, dtype=torch.int16)
    return llava.Examples("toy", images, tokens, torch.full((n,), 2, dtype=torch.int16), [""] * n)


def test_the_empirical_fisher_is_the_mean_of_squared_per_sample_gradients():
    model, rows = TwoParams(), eos_rows([0, 60, 200, 255])
    fisher = importance(model, rows, "ewc", len(rows), torch.Generator().manual_seed(0), fisher="empirical")
    a, b = model.a.item(), model.b.item()
    x = torch.tensor([0, 60, 200, 255]) / 127.5 - 1
    z = 4 + torch.exp(a * x) + torch.exp(b * x)
    # of -log p(EOS) = -a·x + log z
    grad_a, grad_b = -x * (1 - torch.exp(a * x) / z), x * torch.exp(b * x) / z
    assert torch.allclose(fisher["a"], grad_a.pow(2).mean(), atol=1e-6)
    assert torch.allclose(fisher["b"], grad_b.pow(2).mean(), atol=1e-6)
    assert fisher["a"] >= 0 and fisher["b"] >= 0
    assert not torch.allclose(fisher["a"], grad_a.mean().pow(2), atol=1e-3)  # not the squared mean gradient


def test_the_models_own_fisher_does_not_vanish_with_the_square_of_the_error():
    """Two fitted tasks, answered with p = 0.99 and about 0.8 (EOS, the only answer token): per row the
    model's own Fisher of a is E_y[(∂ log p_y/∂a)²] = x²·p(1-p), the empirical one x²·(1-p)². Between the two
    tasks the first differs about 4-fold, the second about 90-fold, and the gap grows as the square of the
    error shrinks: at one λ the empirical penalty barely holds the better-fitted task. Labels sampled for
    8000 rows a task: within 15 % of the expectation."""
    model = TwoParams()
    with torch.no_grad():
        model.a.fill_(math.log(0.99 * (4 + math.exp(-0.4)) / 0.01))  # x = 1 (pixel 255): p(EOS) = 0.99
    means = {}
    for fisher in ("model", "empirical"):
        for pixel in (255, 189):  # x = 1 and 0.48
            x, rows = pixel / 127.5 - 1, eos_rows([pixel] * 8000)
            got = importance(model, rows, "ewc", len(rows), torch.Generator().manual_seed(0), chunk=4000,
                             fisher=fisher)
            z = 4 + math.exp(model.a.item() * x) + math.exp(model.b.item() * x)
            p = math.exp(model.a.item() * x) / z
            expected = x * x * (p * (1 - p) if fisher == "model" else (1 - p) ** 2)
            assert got["a"].item() == pytest.approx(expected, rel=0.15), (fisher, pixel, p)
            means[fisher, pixel] = got["a"].item()
    ratio = {f: means[f, 189] / means[f, 255] for f in ("model", "empirical")}
    assert ratio["model"] < 10 and ratio["empirical"] > 50, ratio


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
    fisher = importance(model, rows, "ewc", len(rows), torch.Generator().manual_seed(0), fisher="empirical")
    loop = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for i in range(len(rows)):
        model.zero_grad()
        _, loss = model(*llava.to_batch(rows, [i], "cpu"))  # one row: the mean NLL of its answer tokens
        loss.backward()
        for n, p in model.named_parameters():
            loop[n] += p.grad ** 2 / len(rows)
    for n in loop:
        assert torch.allclose(fisher[n], loop[n], rtol=1e-4, atol=1e-9), n


def test_ewc_penalty_is_zero_at_the_anchor_and_positive_after_a_step(tok, tasks):
    model = tiny_vlm(tok)
    ewc = strategies.build("ewc", StrategyConfig(importance_samples=16))
    run_task(model, ewc, 0, tasks[0][0])
    batch = llava.to_batch(tasks[1][0], range(8), "cpu")
    assert ewc.penalty(model, batch, None).item() == 0.0
    assert all(bool((f >= 0).all()) for f in ewc.importance.values())
    train_a_little(model, ewc, tasks[1][0], steps=1)
    assert ewc.penalty(model, batch, None).item() > 0


@pytest.mark.parametrize("spec,option", [("ewc", "ewc_lambda"), ("mas", "mas_lambda"),
                                         ("tir", "ewc_lambda")])
def test_regulariser_penalty_and_its_gradient_match_a_hand_computation(tok, tasks, spec, option):
    """penalty = λ·Σ w·(θ - θ*)² and its gradient 2λ·w·(θ - θ*), in float64 by hand, where w is the
    importance (EWC's Fisher, MAS's Ω) or, for TIR, task 0's Fisher times 1 - similarity(task 1, task 0)."""
    lam = 3.0  # not any option's default, and not 1: a penalty that ignores λ cannot match
    model = tiny_vlm(tok)
    strategy = strategies.build(spec, StrategyConfig(importance_samples=16, **{option: lam}))
    run_task(model, strategy, 0, tasks[0][0])
    strategy.before_task(model, 1, tasks[1][0])  # TIR weighs the importances for task 1 here
    importance = strategy.per_task[0] if spec == "tir" else strategy.importance
    anchor, weights = strategy.anchor, importance
    if spec == "tir":
        keep = 1 - task_similarity(strategy.prototypes, 0.5)[1, 0].double()
        weights = {n: f.double() * keep for n, f in importance.items()}
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


def test_ewc_keeps_the_importance_and_anchor_of_a_parameter_frozen_in_a_later_task():
    model, train_rows = TwoParams(), eos_rows([0, 60, 200, 255])
    ewc = strategies.build("ewc", StrategyConfig(importance_samples=4, importance_decay=0.5))
    ewc.after_task(model, 0, train_rows)
    first_b = ewc.importance["b"].clone()
    model.b.requires_grad_(False)  # task 1 trains a only
    with torch.no_grad():
        model.a += 0.3
    ewc.after_task(model, 1, train_rows)
    assert torch.allclose(ewc.importance["b"], 0.5 * first_b)  # kept, decayed by γ
    assert "b" in ewc.anchor and ewc.anchor["b"] == model.b


# ----------------------------------------------------------------------------------------------
# LwF

def test_lwf_penalty_is_zero_against_its_own_copy_and_positive_after_a_step(tok, tasks):
    model, lwf = tiny_vlm(tok), strategies.build("lwf", StrategyConfig())
    run_task(model, lwf, 0, tasks[0][0])
    lwf.before_task(model, 1, tasks[1][0])
    rows = lwf.batch(tasks[1][0].subset(range(8)), torch.Generator().manual_seed(0))
    batch = llava.to_batch(rows, range(16), "cpu")
    assert abs(lwf.penalty(model, batch, model(*batch)[0]).item()) < 1e-6
    train_a_little(model, lwf, tasks[1][0], steps=2)
    assert lwf.penalty(model, batch, model(*batch)[0]).item() > 1e-6


def lwf_after_two_steps(tok, tasks, **options):
    """LwF through task 0 (classify), then two steps into task 1 (read): the model has left its teacher."""
    model, lwf = tiny_vlm(tok), strategies.build("lwf", StrategyConfig(**options))
    run_task(model, lwf, 0, tasks[0][0])
    lwf.before_task(model, 1, tasks[1][0])
    train_a_little(model, lwf, tasks[1][0], steps=2)
    return model, lwf


def lwf_batch(tok, tasks, **options):
    """LwF two steps into task 1 (read) after task 0 (classify), and a batch of 8 read rows with the 8 rows
    it adds -> (model, lwf, rows, batch, the SEP position of each added row)."""
    model, lwf = lwf_after_two_steps(tok, tasks, **options)
    rows = lwf.batch(tasks[1][0].subset(range(8)), torch.Generator().manual_seed(0))
    return model, lwf, rows, llava.to_batch(rows, range(len(rows)), "cpu"), rows.prompt_len[8:].long() - 1


def test_lwf_asks_each_image_an_old_question_with_no_answer_to_learn(tok, tasks):
    model, lwf, rows, batch, _ = lwf_batch(tok, tasks)
    assert [len(t) for t, _ in lwf.questions] == [48]  # task 0's instructions: KEYS = 64, 48 rows
    tokens, lengths = lwf.questions[0]
    assert not tokens[torch.arange(tokens.size(1)) >= lengths[:, None]].any()  # no answer kept
    assert len(rows) == 16 and torch.equal(rows.images[8:], rows.images[:8])  # the same images, asked again
    questions = {tuple(t[:n].tolist()) for t, n in zip(tokens, lengths)}
    assert all(tuple(t[:n].tolist()) in questions for t, n in zip(rows.tokens[8:], rows.prompt_len[8:]))
    assert (batch[2][8:] == -100).all() and (batch[2][:8] != -100).any(1).all()  # no task loss on them
    assert len(strategies.build("lwf", StrategyConfig()).batch(rows, None)) == 16  # no teacher: nothing added


def test_lwf_penalty_and_its_gradient_match_a_hand_computation(tok, tasks):
    """penalty = α·T²·KL(softmax(teacher/T) ‖ softmax(model/T)) at the [SEP] of each added row, averaged over
    them; its gradient α·T·(softmax(model/T) - softmax(teacher/T)) / 8 on those logits, zero elsewhere."""
    alpha, T = 0.7, 2.0  # neither 1: a penalty without α or T² cannot match
    model, lwf, rows, batch, last = lwf_batch(tok, tasks, lwf_alpha=alpha, lwf_temperature=T)
    logits = model(*batch)[0].detach().requires_grad_(True)
    value = lwf.penalty(model, batch, logits)
    assert value.requires_grad, "the penalty has no gradient: it cannot pull the model towards its teacher"
    (grad,) = torch.autograd.grad(value, logits)
    with torch.no_grad():
        teacher = torch.func.functional_call(model, lwf.teacher, (batch[0][8:], batch[1][8:]))[0]
    p = torch.softmax(teacher[torch.arange(8), last].double() / T, -1)  # KL's first argument: the teacher
    q = torch.softmax(logits.detach()[8 + torch.arange(8), last].double() / T, -1)
    hand = alpha * T * T * float((p * (p.log() - q.log())).sum()) / 8
    assert value.item() == pytest.approx(hand, rel=1e-4) and hand > 1e-5
    want = torch.zeros_like(grad, dtype=torch.float64)
    want[8 + torch.arange(8), last] = alpha * T * (q - p) / 8
    assert torch.allclose(grad.double(), want, rtol=1e-3, atol=1e-4 * float(want.abs().max()))


def test_lwf_distils_the_old_questions_whatever_the_new_rows_ask(tok, tasks):
    """The penalty reads only the rows batch() added: the new task's questions and labels, which distilling on
    would fight, do not enter it. (Distilling at the batch's own answer positions fails this.)"""
    model, lwf, rows, batch, _ = lwf_batch(tok, tasks)
    value = lwf.penalty(model, batch, model(*batch)[0]).item()
    other = llava.Examples.concat([tasks[0][0].subset(range(8)), rows.subset(range(8, 16))])  # classify rows
    other = llava.to_batch(other, range(16), "cpu")
    assert lwf.penalty(model, other, model(*other)[0]).item() == pytest.approx(value, rel=1e-5) and value > 0


# ----------------------------------------------------------------------------------------------
# LoRA and expansion

def test_lora_strategy_trains_only_the_adapters(tok, tasks):
    model = tiny_vlm(tok)
    for p in model.vision.parameters():
        p.requires_grad_(True)  # as train.py leaves them with --no-freeze-vision: LoRA must still win
    lora = strategies.build("lora", StrategyConfig(lora_targets="attn.qkv,mlp.2,projector"))
    lora.before_task(model, 0, tasks[0][0])
    _, loss = model(*llava.to_batch(tasks[0][0], range(4), "cpu"))
    loss.backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == (".lora_" in n), n
    assert sum(".lora_" in n for n, _ in model.named_parameters()) == 2 * (2 * SMALL["n_layer"] + 2)
    assert lora.extra_bytes() == 4 * sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)


def test_old_experts_are_bit_identical_after_a_new_task(tok, tasks):
    model, expansion = tiny_vlm(tok), strategies.build("expansion", StrategyConfig(lora_rank=2))
    batch = llava.to_batch(tasks[0][1], range(6), "cpu")
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
    images, ids = llava.pixels(test.images[rows]), test.tokens[rows, :p].long()
    routed = expansion.generate(model, images, ids, 6, llava.EOS)
    expansion.load(model, expansion.experts[1])
    direct = model.generate(images, ids, 6, llava.EOS)
    assert torch.equal(routed[:, :direct.size(1)], direct)


def test_the_router_finds_every_task_of_the_benchmark_on_held_out_rows(tok):
    """No task id given, each held-out row of each of the eight tasks goes to its own task's expert (>= 95 %
    of every task's rows): no two tasks share an instruction template. Keys made by after_task, on an
    untrained model (routing reads only the frozen token embedding). Mean keys per task found classify's
    rows 44 % of the time here (attribute's 84 %): its template is the one nearest the others' mean."""
    model, expansion = tiny_vlm(tok), strategies.build("expansion", StrategyConfig(lora_rank=2))
    splits = [llava.make_task(task, 200, 50, 0, tok, 48, 40) for task in data.TASKS.values()]
    for t, (train, _) in enumerate(splits):
        expansion.before_task(model, t, train)
        expansion.after_task(model, t, train)
    hits = expansion.extra_results(model, [test for _, test in splits])["task_id_accuracy_per_task"]
    assert min(hits) >= 95, dict(zip(data.TASKS, hits))


def test_a_batch_routed_to_several_experts_is_answered_row_by_row_by_each_rows_expert(tok, tasks):
    """One batch of classify and read questions, interleaved: the router splits it, each expert answers its
    rows, and the answers are scattered back to the right rows. A group that ends early is EOS-padded."""
    model, expansion = tiny_vlm(tok), strategies.build("expansion", StrategyConfig(lora_rank=2))
    for t in (0, 1):
        run_task(model, expansion, t, tasks[t][0], steps=3)
    p = 7  # a prompt length both tasks' test rows have: generate takes prompts of one length
    by_task = [[i for i in range(len(tasks[t][1])) if tasks[t][1].prompt_len[i] == p] for t in (0, 1)]
    order = sorted([(k, t, i) for t in (0, 1) for k, i in enumerate(by_task[t])])  # classify, read, ...
    images = torch.cat([llava.pixels(tasks[t][1].images[[i]]) for _, t, i in order])
    ids = torch.cat([tasks[t][1].tokens[[i], :p].long() for _, t, i in order])
    label = [t for _, t, _ in order]
    assert 0 < sum(label) < len(label) and label[:4] == [0, 1, 0, 1]
    features = ev.row_features(model, dict(model.named_parameters()), images, ids,
                                       torch.full((len(ids),), p))[1]
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


def test_expansion_oracle_answers_with_the_named_expert_and_the_plain_strategies_have_none(tok):
    model, gen = tiny_vlm(tok), torch.Generator().manual_seed(0)
    expansion = strategies.build("expansion", StrategyConfig(lora_rank=2))
    tasks = [rows_of(tok, "classify"), rows_of(tok, "read")]
    for t, task_rows in enumerate(tasks):
        expansion.before_task(model, t, task_rows)
        with torch.no_grad():  # a different expert each: a random projector
            for p in model.projector.parameters():
                p.copy_(3 * torch.randn(p.shape, generator=gen))
        expansion.after_task(model, t, task_rows)
    images, ids = llava.pixels(tasks[0].images[:8]), tasks[0].tokens[:8, :8].long()
    told = [expansion.oracle(k).generate(model, images, ids, 5, llava.EOS) for k in (0, 1)]
    assert not torch.equal(told[0], told[1])  # the two experts answer differently
    assert torch.equal(expansion.generate(model, images, ids, 5, llava.EOS), told[0])  # classify rows go to 0
    expansion.load(model, expansion.experts[1])
    direct = model.generate(images, ids, 5, llava.EOS)
    assert torch.equal(told[1][:, :direct.size(1)], direct)
    assert strategies.build("naive", StrategyConfig()).oracle(0) is None
    assert strategies.build("replay+expansion", StrategyConfig()).oracle(0) is not None


# ----------------------------------------------------------------------------------------------
# TIR: importances owned per task, weighed by 1 - similarity on a fixed scale

def test_tir_weights_count_each_tasks_importance_one_minus_its_similarity_times():
    similarity = torch.tensor([[1.0, 0.2, 0.9], [0.2, 1.0, 0.5], [0.9, 0.5, 1.0]])
    per_task = [{"w": torch.tensor([1.0, 2.0, 3.0])},
                {"w": torch.tensor([4.0, 0.0, 1.0]), "v": torch.ones(2)}]
    scaled = tir_weights(per_task, similarity, task_id=2)
    assert torch.allclose(scaled["w"], torch.tensor([0.1 + 2.0, 0.2, 0.3 + 0.5]))
    assert torch.allclose(scaled["v"], torch.full((2,), 0.5))  # trainable in task 1 only


def test_tir_with_every_similarity_zero_is_ewc(tok, tasks, monkeypatch):
    """On EWC's footing: the same importances, λ and anchor; only the similarity tells the two apart."""
    monkeypatch.setattr(strategies, "task_similarity", lambda prototypes, tau: torch.eye(len(prototypes)))
    cfg = StrategyConfig(importance_samples=8, ewc_lambda=3.0)
    runs = {}
    for spec in ("ewc", "tir"):
        model, strategy = tiny_vlm(tok), strategies.build(spec, cfg)
        run_task(model, strategy, 0, tasks[0][0])
        run_task(model, strategy, 1, tasks[1][0])
        strategy.before_task(model, 2, tasks[0][0])
        runs[spec] = model, strategy
    (_, ewc), (_, tir) = runs["ewc"], runs["tir"]
    assert ewc.weights().keys() == tir.weights().keys()
    assert all(torch.allclose(ewc.weights()[n], tir.weights()[n]) for n in ewc.weights())
    penalties = []
    for model, strategy in runs.values():  # both moved off their anchors the same way
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01)
        penalties.append(strategy.penalty(model, None, None).item())
    assert penalties[0] > 0 and penalties[1] == pytest.approx(penalties[0], rel=1e-5)


def test_identical_tasks_are_the_most_similar(tok, tasks):
    """Two halves of classify's rows (different scenes, the same kind of task) beside read and count: the
    halves are each other's nearest task by far, by more than twice any other pair."""
    model = tiny_vlm(tok)
    base = dict(model.named_parameters())
    classify = tasks[0][0]
    count = llava.make_task(data.TASKS["count"], 48, 1, 0, tok, 48, 40)[0]
    rows = [classify.subset(range(24)), tasks[1][0], count, classify.subset(range(24, 48))]
    assert not torch.equal(rows[0].images, rows[3].images)  # other scenes: no cosine of 1 by construction
    prototypes = [[f.mean(0) for f in ev.examples_features(model, base, r)] for r in rows]
    similarity = task_similarity(prototypes, 0.5)
    assert torch.allclose(similarity, similarity.T) and bool(((similarity > 0) & (similarity <= 1)).all())
    others = [float(similarity[i, j]) for i in range(4) for j in range(i + 1, 4) if (i, j) != (0, 3)]
    assert similarity[0, 3] > 2 * max(others), (similarity[0, 3], others)  # classify's halves: the closest


def test_similarity_ignores_a_direction_that_every_token_shares(tok, tasks):
    """A trained embedding gives all tokens one large common direction; here one is added by hand, five times
    the embeddings' own norm. Task features are centred on the vocabulary's mean, so the similarities are
    the plain model's, and two tasks' instruction features stay apart (cosine below 0.99)."""
    model = tiny_vlm(tok)
    rows = [tasks[0][0], tasks[1][0], llava.make_task(data.TASKS["count"], 48, 1, 0, tok, 48, 40)[0]]

    def similarity_and_features():
        base = dict(model.named_parameters())
        prototypes = [[f.mean(0) for f in ev.examples_features(model, base, r)] for r in rows]
        return task_similarity(prototypes, 0.5), [p[1] for p in prototypes]
    plain, _ = similarity_and_features()
    with torch.no_grad():
        table = model.tok_emb.weight
        common = F.normalize(torch.randn(table.size(1), generator=torch.Generator().manual_seed(0)), dim=0)
        table += 5 * table.norm(dim=1).mean() * common
    shifted, instructions = similarity_and_features()
    assert torch.allclose(shifted, plain, atol=1e-5)
    assert F.cosine_similarity(instructions[0], instructions[2], dim=0) < 0.99


def test_tir_end_to_end_on_two_tasks(tok, tasks):
    model = tiny_vlm(tok)
    tir = strategies.build("tir", StrategyConfig(importance_samples=8))
    run_task(model, tir, 0, tasks[0][0])
    tir.before_task(model, 1, tasks[1][0])
    keep = 1 - task_similarity(tir.prototypes, 0.5)[1, 0]
    assert len(tir.per_task) == 1 and tir.weights().keys() == tir.per_task[0].keys()
    for n, f in tir.per_task[0].items():  # task 0's importance, counted 1 - similarity times
        assert torch.allclose(tir.weights()[n], f * keep)


def tir_keep(tok, sequence):
    """TIR through its hooks on tasks in sequence (no training steps) -> the factor 1 - similarity that its
    penalty applies to the first task's importance before the last task, and the strategy."""
    model, tir = tiny_vlm(tok), strategies.build("tir", StrategyConfig(importance_samples=8))
    for t, task_rows in enumerate(sequence[:-1]):
        tir.before_task(model, t, task_rows)
        tir.after_task(model, t, task_rows)
    tir.before_task(model, len(sequence) - 1, sequence[-1])
    return 1 - tir.used[-1][0], tir


def test_tir_tells_an_identical_task_from_an_unrelated_one_at_the_second_task(tok):
    """The old z-score gave 0.125 to any pair at T = 2 (both off-diagonal entries equal, std 0)."""
    # other rows of the same task
    same, _ = tir_keep(tok, [rows_of(tok, "classify"), rows_of(tok, "classify", "test")])
    other, _ = tir_keep(tok, [rows_of(tok, "classify"), rows_of(tok, "read")])
    assert same < 0.5 < other  # the same task needs little protection, an unrelated one much


def test_tir_similarity_does_not_depend_on_the_tasks_before(tok):
    _, after_one = tir_keep(tok, [rows_of(tok, "count"), rows_of(tok, "ground")])
    _, after_two = tir_keep(tok, [rows_of(tok, "read"), rows_of(tok, "count"), rows_of(tok, "ground")])
    assert after_one.used[1][0] == pytest.approx(after_two.used[2][1], abs=1e-6)
    full = after_two.extra_results(None, [])  # the saved rows are the ones used, and the lower triangle
    assert full["task_similarity_used"] == after_two.used
    assert [len(row) for row in after_two.used] == [1, 2, 3]
    assert full["task_similarity"][2][:3] == pytest.approx(after_two.used[2])


# ----------------------------------------------------------------------------------------------
# Each strategy does what it exists for, on a seeded micro-benchmark that trains in seconds.
#
# Two tasks ask about the same noisy colour swatches: task 0 ("colour?") names the colour with one set of
# answer tokens, task 1 ("next?") names the next colour round a wheel with another set. A tiny VLM learns
# task 0, then task 1 through train.py's own tune(): naive tuning learns to answer every question with task
# 1's tokens and forgets task 0. Each strategy must then show its effect against naive by a wide margin:
# replay keeps task 0's accuracy, EWC/MAS/TIR hold the parameters they protect, LwF keeps task 0's answers
# near the teacher's, and expansion's old expert answers task 0 exactly as it did. Each test fails if the
# strategy's hook is swapped for naive's (tools/mutants.py does just that).

N_COLOURS, QUESTIONS = 4, (5, 6)  # token 5 asks task 0's question, 6 task 1's
ANSWERS = (8, 12)  # task t answers with tokens ANSWERS[t] .. ANSWERS[t] + 3
CONFIG = ModelConfig(vocab_size=16, image_size=16, patch_size=8, vit_dim=32, vit_layers=1, d_model=32,
                     n_layer=2, n_head=2, max_text_len=6)  # one layer: some seeds never read the question
STEPS = 150  # each task is learnt to 100 % in this many (test_the_benchmark_is_learnt_and_naive_forgets)
PALETTE = torch.tensor([[220, 40, 40], [40, 200, 60], [50, 60, 230], [230, 220, 50]])


def swatches(task, n, seed):
    """n rows of a task: a swatch of colour c with seeded noise; the answer ANSWERS[task] + (c + task) % 4."""
    gen = torch.Generator().manual_seed(1000 * task + seed)
    colour = torch.randint(N_COLOURS, (n,), generator=gen)
    noise = torch.randint(-30, 31, (n, 3, CONFIG.image_size, CONFIG.image_size), generator=gen)
    images = (PALETTE[colour][:, :, None, None] + noise).clamp(0, 255).to(torch.uint8)
    answer = ANSWERS[task] + (colour + task) % N_COLOURS
    tokens = torch.zeros(n, CONFIG.max_text_len, dtype=torch.int16)  # [BOS] q [SEP] answer [EOS] [PAD]
    columns = [llava.BOS, QUESTIONS[task], llava.SEP, answer, llava.EOS]
    tokens[:, :5] = torch.stack([c if torch.is_tensor(c) else torch.full_like(answer, c) for c in columns], 1)
    return llava.Examples(f"task{task}", images, tokens, torch.full((n,), 3, dtype=torch.int16),
                         [str(a) for a in answer.tolist()])


TRAIN = [swatches(t, 256, seed=0) for t in (0, 1)]
TEST = [swatches(t, 64, seed=1) for t in (0, 1)]
LOOP = SimpleNamespace(seed=0, freeze_vision=True, steps=STEPS, lr=3e-3, batch_size=16, compile=False,
                       bf16=False, checkpoint_every=10 ** 9)  # what tune() reads of train.py's config


@pytest.fixture(autouse=True)
def quiet(monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")


def learn(spec, n_tasks=2, **options):
    """A fresh seeded model tuned on tasks 0..n_tasks-1 through train.tune -> (model, strategy, snapshots),
    snapshots[t] the parameters right after task t."""
    model = VLM(CONFIG, seed=0)
    strategy = strategies.build(spec, StrategyConfig(**options), seed=0)
    snapshots = []
    for t in range(n_tasks):
        train.tune(t, model, strategy, TRAIN[t], LOOP, torch.device("cpu"), f"task {t}", None, None)
        snapshots.append(strategies.copy_params(model.named_parameters()))
    return model, strategy, snapshots


@torch.no_grad()
def accuracy(model, strategy, examples):
    """% of rows whose first generated token is the answer, through the strategy (which may route)."""
    model.eval()
    out = strategy.generate(model, llava.pixels(examples.images), examples.tokens[:, :3].long(), 1, llava.EOS)
    return 100 * (out[:, 0] == examples.tokens[:, 3].long()).float().mean().item()


@pytest.fixture(scope="module")
def naive():
    return learn("naive")


def test_the_benchmark_is_learnt_and_naive_forgets(naive):
    """The benchmark itself: both tasks are learnt, and naive tuning on task 1 wipes task 0 out."""
    model, strategy, snapshots = naive
    assert accuracy(model, strategy, TEST[1]) >= 90
    model.load_state_dict(snapshots[0], strict=False)
    assert accuracy(model, strategy, TEST[0]) >= 90
    model.load_state_dict(snapshots[1], strict=False)
    assert accuracy(model, strategy, TEST[0]) <= 30


def test_replay_keeps_task_0(naive):
    model, strategy, _ = learn("replay", buffer_size=64, replay_ratio=0.25)
    replayed, forgotten = accuracy(model, strategy, TEST[0]), accuracy(naive[0], naive[1], TEST[0])
    assert replayed >= forgotten + 50, (replayed, forgotten)
    assert accuracy(model, strategy, TEST[1]) >= 90  # and it still learns the new task


def weighted_drift(weights, anchor, params):
    """Σ w·(θ - θ*)²: how far the parameters that the weights protect moved from the anchor."""
    return sum((w * (params[n] - anchor[n]) ** 2).sum().item() for n, w in weights.items())


@pytest.mark.parametrize("spec,options", [("ewc", dict(ewc_lambda=1e4)), ("mas", dict(mas_lambda=10.0)),
                                          ("tir", dict(ewc_lambda=1e4))])
def test_regularisers_hold_the_parameters_they_protect(naive, spec, options):
    model, strategy, snapshots = learn(spec, n_tasks=1, importance_samples=64, **options)
    first = strategy.per_task[0] if spec == "tir" else strategy.importance
    protect = {n: f.clone() for n, f in first.items()}  # task 0's importances, before merging
    assert protect and all(torch.equal(strategy.anchor[n], naive[2][0][n]) for n in protect)  # one anchor
    train.tune(1, model, strategy, TRAIN[1], LOOP, torch.device("cpu"), "task 1", None, None)
    held = weighted_drift(protect, naive[2][0], dict(model.named_parameters()))
    free = weighted_drift(protect, naive[2][0], naive[2][1])
    assert held < 0.2 * free, (held, free)


def teacher_gap(model, teacher, rows):
    """Mean KL(teacher ‖ model) over rows' answer positions: how far the model's answers moved."""
    batch = llava.to_batch(rows, range(len(rows)), "cpu")
    with torch.no_grad():
        new = model(*batch[:2])[0]
        old = torch.func.functional_call(model, teacher, batch[:2])[0]
    answer = batch[2] != -100
    return F.kl_div(F.log_softmax(new[answer], -1), F.log_softmax(old[answer], -1), log_target=True,
                    reduction="batchmean").item()


def test_lwf_keeps_task_0_answers_near_the_teacher(naive):
    model, strategy, snapshots = learn("lwf", lwf_alpha=3.0)
    distilled, free = teacher_gap(model, snapshots[0], TEST[0]), teacher_gap(naive[0], naive[2][0], TEST[0])
    assert distilled < 0.5 * free, (distilled, free)


def test_expansion_old_expert_answers_its_task_as_right_after_training(naive):
    model, strategy, _ = learn("expansion", n_tasks=1, lora_rank=4)
    right_after = accuracy(model, strategy, TEST[0])
    train.tune(1, model, strategy, TRAIN[1], LOOP, torch.device("cpu"), "task 1", None, None)
    assert right_after >= 90 and accuracy(model, strategy, TEST[0]) == right_after
    assert accuracy(model, strategy, TEST[1]) >= 90  # the new expert learnt its own task
    assert accuracy(naive[0], naive[1], TEST[0]) <= right_after - 50  # what the routing saves
