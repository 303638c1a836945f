"""Each strategy does what it exists for, on a seeded micro-benchmark that trains in seconds.

    python -m pytest tests/test_behaviour.py -q

Two tasks ask about the same noisy colour swatches: task 0 ("colour?") names the colour with one set of
answer tokens, task 1 ("next?") names the next colour round a wheel with another set. A tiny VLM learns
task 0, then task 1 through train.py's own tune(): naive tuning learns to answer every question with task 1's
tokens and forgets task 0. Each strategy must then show its effect against naive by a wide margin: replay
keeps task 0's accuracy, EWC/MAS/TIR hold the parameters they protect, LwF keeps task 0's answers near the
teacher's, and expansion's old expert answers task 0 exactly as it did. Each test fails if the strategy's
hook is swapped for naive's (tests/mutants.py does just that).
"""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import data
import strategies
import train
from model import VLM, ModelConfig
from strategies import StrategyConfig

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
    columns = [data.BOS, QUESTIONS[task], data.SEP, answer, data.EOS]
    tokens[:, :5] = torch.stack([c if torch.is_tensor(c) else torch.full_like(answer, c) for c in columns], 1)
    return data.Examples(f"task{task}", images, tokens, torch.full((n,), 3, dtype=torch.int16),
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
def accuracy(model, strategy, rows):
    """% of rows whose first generated token is the answer, through the strategy (which may route)."""
    model.eval()
    out = strategy.generate(model, data.pixels(rows.images), rows.tokens[:, :3].long(), 1, data.EOS)
    return 100 * (out[:, 0] == rows.tokens[:, 3].long()).float().mean().item()


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
                                          ("tir", dict(tir_lambda=100.0))])
def test_regularisers_hold_the_parameters_they_protect(naive, spec, options):
    model, strategy, snapshots = learn(spec, n_tasks=1, importance_samples=64, **options)
    protect = {n: f.clone() for n, f in strategy.importance.items()}  # task 0's importances, before merging
    assert protect and all(torch.equal(strategy.anchor[n], naive[2][0][n]) for n in protect)  # one anchor
    train.tune(1, model, strategy, TRAIN[1], LOOP, torch.device("cpu"), "task 1", None, None)
    held = weighted_drift(protect, naive[2][0], dict(model.named_parameters()))
    free = weighted_drift(protect, naive[2][0], naive[2][1])
    assert held < 0.2 * free, (held, free)


def teacher_gap(model, teacher, rows):
    """Mean KL(teacher ‖ model) over rows' answer positions: how far the model's answers moved."""
    batch = data.to_batch(rows, range(len(rows)), "cpu")
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
